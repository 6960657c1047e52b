"""Tables that fit the terminal without cutting a word.

When a table is wider than the terminal, rich narrows its widest columns first, below the length of
their longest word, and then cuts those words with an ellipsis (an adapter's date became "2025-0…"),
although narrower columns were free to wrap. `Fitted` gives every column its longest word first and
shares the remaining width by how much each column still wants.
"""

from __future__ import annotations

import re

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


class Fitted:
    """A rich Table rendered at the console's width with no column narrower than its longest word,
    as long as the words fit side by side at all (else rich's own narrowing applies)."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self.table)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        table = self.table
        for column in table.columns:
            column.width = None  # measured afresh at each width
        unlimited = options.update_width(10**6)
        ranges = []
        for column in table.columns:
            cells = [Measurement.get(console, unlimited, cell) for cell in (column.header, *column.cells)]
            longest = max(cell.maximum for cell in cells)
            ranges.append((longest if column.no_wrap else max(cell.minimum for cell in cells), longest))
        _, right, _, left = table.padding
        padding = (left + right) * len(table.columns)
        borders = Measurement.get(console, unlimited, table).maximum - padding - sum(high for _, high in ranges)
        room = options.max_width - borders - padding
        least = sum(low for low, _ in ranges)
        if sum(high for _, high in ranges) > room and least <= room:
            widths = share_out(room, ranges)
            for column, width in zip(table.columns, widths):
                column.width = width
        yield table


def share_out(room: int, ranges: list[tuple[int, int]]) -> list[int]:
    """Widths between each (least, most) range that add up to `room` (at least the sum of the leasts): the
    spare width is shared equally, and a column that needs less than its share is made whole first, so
    short columns (a size, a date) print on one line and the long ones share what is left."""
    widths = [low for low, _ in ranges]
    spare = room - sum(widths)
    hungry = [index for index, (low, high) in enumerate(ranges) if high > low]
    while spare > 0 and hungry:
        share = max(spare // len(hungry), 1)
        for index in sorted(hungry, key=lambda i: ranges[i][1] - widths[i]):
            grant = min(share, ranges[index][1] - widths[index], spare)
            widths[index] += grant
            spare -= grant
        hungry = [index for index in hungry if widths[index] < ranges[index][1]]
    return widths


class Breakable:
    """A table cell that may also wrap after '/', '-' or '_', where hub ids and paths read naturally
    (mistralai/ Mistral-7B- Instruct-v0.2), rather than being cut at the column's edge: rich wraps only
    at spaces."""

    BREAK_AFTER = re.compile(r"[^/\-_\s]*(?:[/\-_\s]+|$)")

    def __init__(self, text: str) -> None:
        self.text = text
        self.parts = [part for part in self.BREAK_AFTER.findall(text) if part] or [""]

    def __str__(self) -> str:
        return self.text

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(max(cell_len(part.rstrip()) for part in self.parts), cell_len(self.text))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = [""]
        for part in self.parts:
            if lines[-1] and cell_len(lines[-1] + part.rstrip()) > options.max_width:
                lines.append("")
            lines[-1] += part
        yield Text("\n".join(line.rstrip() for line in lines))
