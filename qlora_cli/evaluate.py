"""Command `eval`: the base and adapters side by side on held-out rows, in one table.

Two kinds of figure: teacher-forced loss and perplexity on the response tokens (what training
optimised), and greedy exact match of the generated answer (what a user sees).
"""

from __future__ import annotations

import json
import math
import random
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from rich.console import Group
from rich.table import Table
from rich.text import Text

from qlora_cli.adapters import AdapterRecord
from qlora_cli.chat import last_content
from qlora_cli.data import IGNORE_INDEX, RowFile, check_data, listed_rows
from qlora_cli.errors import QloraError
from qlora_cli.files import prepare_output_file
from qlora_cli.generate import BASE, MIX, Sampling, Session, load_records, open_session, parse_mix, style_for
from qlora_cli.prompts import Renderer
from qlora_cli.recipe import local_or_hub

MISSES_SHOWN = 3  # per adapter, under the table; --out holds every row
WIDTH = 80  # the terminal the table and the misses are laid out for


@dataclass(frozen=True)
class ScoredRow:
    """One held-out row as one adapter answered it: what `--out` writes for every row."""

    row: int  # 1-based, in the data file's order
    instruction: str
    input: str
    reference: str  # the completion the adapter was trained to write for this row
    prediction: str  # its greedy answer
    exact_match: bool
    execution_match: bool | None = None  # --sql: the answer returns the reference's rows

    def as_dict(self) -> dict:
        fields = {
            "row": self.row,
            "instruction": self.instruction,
            "input": self.input,
            "reference": self.reference,
            "prediction": self.prediction,
            "exact_match": self.exact_match,
        }
        if self.execution_match is not None:
            fields["execution_match"] = self.execution_match
        return fields


@dataclass(frozen=True)
class Score:
    """One adapter's figures on the held-out rows, and the rows they come from."""

    adapter: str
    examples: int
    loss: float  # mean cross-entropy per response token
    perplexity: float
    exact_match: float  # share of greedy answers equal to the reference
    execution_match: float | None = None  # share of SQL answers returning the reference's rows (--sql)
    rows: tuple[ScoredRow, ...] = ()

    def as_dict(self) -> dict:
        """The totals, then every row (`--out`): scripts read the totals by name, people read the rows."""
        fields = {
            "adapter": self.adapter,
            "examples": self.examples,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "exact_match": self.exact_match,
        }
        if self.execution_match is not None:
            fields["execution_match"] = self.execution_match
        fields["rows"] = [row.as_dict() for row in self.rows]
        return fields

    @property
    def misses(self) -> list[ScoredRow]:
        """Rows answered wrong: by execution with --sql (same rows returned is right), else by text."""
        return [row for row in self.rows if not (row.exact_match or row.execution_match)]


@dataclass(frozen=True)
class PreferenceScore:
    """One adapter on preference pairs: how often it gives the chosen answer more probability than the
    rejected one, and by how much (the log-probability margin, in nats, that DPO's reward measures)."""

    adapter: str
    pairs: int
    accuracy: float  # share of pairs with log p(chosen) > log p(rejected)
    margin: float  # mean of log p(chosen) - log p(rejected)
    margins: tuple[float, ...] = ()  # per pair, in file order

    def as_dict(self) -> dict:
        return {
            "adapter": self.adapter,
            "pairs": self.pairs,
            "accuracy": self.accuracy,
            "margin": self.margin,
            "margins": list(self.margins),
        }


@dataclass(frozen=True)
class Evaluation:
    data: str  # as given on the command line
    base_id: str
    mix: str | None  # the --mix spec, scored under the adapter name 'mix'
    sql: bool
    scores: tuple[Score, ...]
    out: Path | None = None  # where every row was written
    preferences: tuple[PreferenceScore, ...] = ()  # for preference data, instead of scores


def exact_match(
    session: Session, rows: list[dict], adapter: str, sampling: Sampling | None = None
) -> tuple[float, list[str]]:
    """Share of answers (greedy unless `sampling` says otherwise) equal to the reference completion, and the answers."""
    answers = session.ask(rows, adapter, sampling or Sampling())
    hits = sum(answer == session.example(row, adapter)["completion"].strip() for answer, row in zip(answers, rows))
    return hits / len(rows), answers


def padded_logits(session: Session, adapter: str, sequences: list[list[int]]) -> torch.Tensor:
    """fp32 logits of token sequences run as one batch through `adapter`, padded on the right."""
    model, pad = session.model, session.tokenizer.pad_token_id
    width = max(len(ids) for ids in sequences)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in sequences])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in sequences])
    with torch.inference_mode(), session.using(adapter):
        return model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits.float()


def response_loss(session: Session, rows: list[dict], adapter: str, batch_size: int = 16) -> float:
    """Mean cross-entropy per response token (EOS included), the loss training reports."""
    renderer = session.renderer(adapter)
    examples = [renderer.example(row, train_on="last") for row in rows]
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        logits = padded_logits(session, adapter, [e["input_ids"] for e in chunk])
        width = logits.shape[1]
        labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in chunk])
        shifted = labels[:, 1:].to(logits.device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),
            shifted.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += losses.item()
        count += int((shifted != IGNORE_INDEX).sum())
    return total / count


SCHEMA = re.compile(r"table\s+(\w+)\s*\(([^)]*)\)", re.IGNORECASE)
LITERAL = re.compile(r"'([^']*)'|\b(\d+(?:\.\d+)?)\b")


def sql_execution_match(schema: str, reference: str, generated: str, seed: str = "") -> bool:
    """Run both queries on an in-memory SQLite database built from the schema and compare results.

    The tables are filled with rows that use the literals of both queries plus filler values, so a
    WHERE clause selects something and a wrong literal or column shows up as a different result.
    """
    tables = SCHEMA.findall(schema)
    if not tables:
        return generated.strip() == reference.strip()
    literals = [text or number for text, number in LITERAL.findall(reference + " " + generated)]
    rng = random.Random(f"{seed}|{schema}")
    database = sqlite3.connect(":memory:")
    try:
        for table, columns in tables:
            names = [column.strip() for column in columns.split(",") if column.strip()]
            database.execute(f"CREATE TABLE {table} ({', '.join(names)})")
            pool = literals + ["alpha", "beta", "gamma", 3, 7, 12, 25, 40, 64, 99]
            for _ in range(12):
                row = [_typed(rng.choice(pool)) for _ in names]
                database.execute(f"INSERT INTO {table} VALUES ({', '.join('?' * len(names))})", row)
        expected = database.execute(reference).fetchall()
        try:
            got = database.execute(generated).fetchall()
        except sqlite3.Error:
            return False
    finally:
        database.close()
    if "order by" in reference.lower():
        return got == expected
    return sorted(map(repr, got)) == sorted(map(repr, expected))


def _typed(value):
    if isinstance(value, str) and value.replace(".", "", 1).isdigit():
        return float(value) if "." in value else int(value)
    return value


def run(
    data: str,
    adapter_refs: list[str],
    *,
    mix: str | None = None,
    sql: bool = False,
    max_rows: int | None = None,
    out: Path | None = None,
    base: str | None = None,
    home: str | None = None,
) -> Evaluation:
    """Command `eval`: score the base and each adapter (and the mix) on held-out rows; `out` also gets JSON,
    every row included. The output path and the data are checked before any weights load."""
    if out is not None:
        prepare_output_file(out, "--out", "eval.json")
    data_path = local_or_hub(data, Path.cwd())  # a file relative to here, or a hub dataset id
    if data_path is None:
        raise QloraError(f"--data: file not found: {data}")
    weights = parse_mix(mix) if mix else None
    records = load_records(adapter_refs, mix=weights, home=home)
    names = [ref if ref == BASE else records[ref].folder.name for ref in adapter_refs] + ([MIX] if mix else [])
    mix_lead = records[next(iter(weights))].folder.name if weights else None
    rows = held_out_rows(
        data_path,
        names,
        {record.folder.name: record for record in records.values()},
        mix_lead=mix_lead,
        max_rows=max_rows,
    )
    preference = any("chosen" in row for name_rows in rows.values() for row in name_rows[:1])
    if preference and sql:
        raise QloraError("--sql runs generated queries; preference data is scored by likelihood, without --sql")
    pairs: dict[str, list[dict]] = {}

    def render_rows(tokenizer) -> None:
        """Every row as each name is prompted (a mix as its first member, the base as the first adapter), so that
        a row the template refuses is named before the weights load; preference pairs are kept for scoring."""
        styles = {record.folder.name: record.style for record in records.values()}
        for name, name_rows in rows.items():
            renderer = Renderer(style_for(styles, mix_lead if name == MIX else name), tokenizer)
            rendered = rendered_rows(renderer, name_rows, data_path, name, preference=preference)
            if preference:
                pairs[name] = rendered

    session = open_session(adapter_refs, mix=weights, base=base, home=home, before_weights=render_rows)
    scores = [] if preference else score(session, rows, sql=sql)
    preferences = [preference_score(session, name_pairs, name) for name, name_pairs in pairs.items()]
    if out is not None:
        results = [result.as_dict() for result in (preferences or scores)]
        out.write_text(json.dumps({"data": data_path, "base": session.base_id, "results": results}, indent=2) + "\n")
    return Evaluation(
        data=data,
        base_id=session.base_id,
        mix=mix,
        sql=sql,
        scores=tuple(scores),
        out=out,
        preferences=tuple(preferences),
    )


def rendered_rows(
    renderer: Renderer, rows: list[dict], data_path: str, adapter: str, *, preference: bool
) -> list[dict]:
    """Each row rendered as `adapter` was trained to be prompted (a preference pair, or the example whose
    response eval's loss reads); a row the template cannot render is named (eval's rows are the file's, in
    order, none dropped)."""
    rendered = []
    for number, row in enumerate(rows, start=1):
        try:
            rendered.append(renderer.preference(row) if preference else renderer.example(row, train_on="last"))
        except QloraError as error:
            raise QloraError(f"--data: {data_path}: row {number}, rendered for {adapter}: {error}") from None
    return rendered


def preference_score(session: Session, pairs: list[dict], adapter: str) -> PreferenceScore:
    """log p(chosen) - log p(rejected) of each rendered pair."""
    chosen = answer_logps(session, adapter, [(pair["prompt_ids"], pair["chosen_ids"]) for pair in pairs])
    rejected = answer_logps(session, adapter, [(pair["prompt_ids"], pair["rejected_ids"]) for pair in pairs])
    margins = [c - r for c, r in zip(chosen, rejected)]
    return PreferenceScore(
        adapter=adapter,
        pairs=len(pairs),
        accuracy=round(sum(margin > 0 for margin in margins) / len(margins), 4),
        margin=round(sum(margins) / len(margins), 4),
        margins=tuple(round(margin, 4) for margin in margins),
    )


def answer_logps(
    session: Session, adapter: str, sequences: list[tuple[list[int], list[int]]], batch_size: int = 16
) -> list[float]:
    """Sum of log-probabilities of each answer given its prompt."""
    totals = []
    for start in range(0, len(sequences), batch_size):
        chunk = [prompt + answer for prompt, answer in sequences[start : start + batch_size]]
        logps = torch.log_softmax(padded_logits(session, adapter, chunk), dim=-1)
        for row, (prompt, answer) in enumerate(sequences[start : start + batch_size]):
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1, device=logps.device)
            targets = torch.tensor(answer, device=logps.device)
            totals.append(logps[row, positions, targets].sum().item())
    return totals


def trained_columns(record: AdapterRecord) -> dict[str, str]:
    """The data.columns mapping the adapter was trained with: from its record, or, for an adapter whose
    qlora.json predates that field, from the recipe.yaml beside it."""
    if record.data.columns:
        return dict(record.data.columns)
    recipe = record.folder / "recipe.yaml"
    if not recipe.is_file():
        return {}
    section = (yaml.safe_load(recipe.read_text()) or {}).get("data") or {}
    return dict(section.get("columns") or {})


def held_out_rows(
    data_path: str,
    names: list[str],
    records: dict[str, AdapterRecord],
    *,
    mix_lead: str | None = None,
    max_rows: int | None = None,
) -> dict[str, list[dict]]:
    """The rows each evaluated name reads, mapped with the columns its adapter was trained on and checked,
    all before any weights load. The base reads them as the first adapter does, and a mix as its first
    member (`mix_lead`): the same way each is prompted (Session.style)."""
    first = next(iter(records), None)
    mapped: dict[str, list[dict]] = {}  # by mapping: adapters trained alike share one reading of the file
    rows = {}
    for name in names:
        owner = mix_lead if name == MIX else name if name in records else first
        columns = trained_columns(records[owner]) if owner else {}
        key = json.dumps(columns, sort_keys=True)
        if key not in mapped:
            mapped[key] = _checked_rows(data_path, columns, owner, max_rows)
        rows[name] = mapped[key]
    return rows


def _checked_rows(data_path: str, columns: dict[str, str], owner: str | None, max_rows: int | None) -> list[dict]:
    """The file's rows with `columns` applied, every problem reported at once (eval scores every row, so
    none is dropped)."""
    how = f" (read with data.columns {columns}, as adapter {owner!r} was trained)" if columns else ""
    try:  # 'drop' here only lets every bad row be listed below, with eval's own fix
        checked = check_data(RowFile(data_path, split="test", columns=columns, max_rows=max_rows, invalid_rows="drop"))
    except QloraError as error:
        raise QloraError(f"--data: {str(error).removeprefix('data.path: ')}{how}") from None
    if checked.bad:
        raise QloraError(
            f"--data: {data_path}: {len(checked.bad)} of {checked.total} rows cannot be scored{how}; "
            f"fix them or remove them:{listed_rows(checked.bad)}"
        )
    return list(checked.rows)


def render(evaluation: Evaluation) -> Group:
    """The scores in one table, and under it a few misses of each adapter, all within 80 columns."""
    if evaluation.preferences:
        return Group(render_preferences(evaluation))
    table = Table(title=f"{evaluation.data} on {_shown_path(evaluation.base_id)}")
    columns = ["adapter", "rows", "loss", "perplexity", "exact\nmatch"] + (
        ["execution\nmatch"] if evaluation.sql else []
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "adapter" else "right")
    for result in evaluation.scores:
        cells = [
            f"mix {evaluation.mix}" if evaluation.mix and result.adapter == MIX else result.adapter,
            str(result.examples),
            f"{result.loss:.3f}",
            f"{result.perplexity:.2f}",
            f"{100 * result.exact_match:.1f}%",
        ]
        if result.execution_match is not None:
            cells.append(f"{100 * result.execution_match:.1f}%")
        table.add_row(*cells)
    return Group(table, *render_misses(evaluation))


def render_preferences(evaluation: Evaluation) -> Table:
    table = Table(title=f"{evaluation.data} on {_shown_path(evaluation.base_id)}")
    for column in ("adapter", "pairs", "chosen\npreferred", "log-prob\nmargin"):
        table.add_column(column, justify="left" if column == "adapter" else "right")
    for result in evaluation.preferences:
        name = f"mix {evaluation.mix}" if evaluation.mix and result.adapter == MIX else result.adapter
        table.add_row(name, str(result.pairs), f"{100 * result.accuracy:.1f}%", f"{result.margin:+.2f}")
    return table


def render_misses(evaluation: Evaluation) -> list[Text]:
    """Up to MISSES_SHOWN wrong answers per adapter, each line shortened to WIDTH columns, then where every
    row is."""
    lines = []
    for result in evaluation.scores:
        misses = result.misses
        if not misses:
            continue
        first = f"the first {MISSES_SHOWN}" if len(misses) > MISSES_SHOWN else "all shown"
        lines += [
            Text(""),
            Text(_fit(f"{result.adapter} missed {len(misses)} of {result.examples}, {first}:"), style="bold"),
        ]
        for miss in misses[:MISSES_SHOWN]:
            asked = f"{miss.instruction} | {miss.input}" if miss.input.strip() else miss.instruction
            lines.append(Text(_fit(f"  row {miss.row}: {asked}")))
            lines.append(Text(_fit(f"    want {miss.reference}"), style="green"))
            lines.append(Text(_fit(f"    got  {miss.prediction}"), style="red"))
    if lines:
        where = f"every row, with its answer: {evaluation.out}" if evaluation.out else "--out FILE writes every row"
        lines += [Text(""), Text(where, style="dim")]
    return lines


def _fit(line: str, width: int = WIDTH) -> str:
    """One terminal line: line breaks shown as spaces, cut with an ellipsis past `width`."""
    line = " ".join(line.split("\n"))
    return line if len(line) <= width else line[: width - 1] + "…"


def _shown_path(model_id: str) -> str:
    """A local base as a path relative to here when it lies below (titles stay short); a hub id as it is."""
    path = Path(model_id)
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        return str(path.relative_to(Path.cwd()))
    return model_id


def score(session: Session, rows_by_name: dict[str, list[dict]], *, sql: bool = False) -> list[Score]:
    """Each name's loss, answers and matches on its rows (held_out_rows)."""
    scores = []
    for adapter, rows in rows_by_name.items():
        loss = response_loss(session, rows, adapter)
        answers = session.ask(rows, adapter, Sampling(max_new_tokens=_answer_budget(session, rows, adapter)))
        references = [session.example(row, adapter)["completion"].strip() for row in rows]
        executions: list[bool | None] = [None] * len(rows)
        if sql:
            executions = [
                sql_execution_match(row.get("input") or "", row["output"], answer, row["instruction"])
                for row, answer in zip(rows, answers)
            ]
        scored = tuple(
            ScoredRow(
                row=number,
                instruction=asked_text(row),
                input=row.get("input") or "",
                reference=reference,
                prediction=answer,
                exact_match=answer == reference,
                execution_match=execution,
            )
            for number, (row, reference, answer, execution) in enumerate(
                zip(rows, references, answers, executions), start=1
            )
        )
        scores.append(
            Score(
                adapter=adapter,
                examples=len(rows),
                loss=round(loss, 4),
                perplexity=round(math.exp(loss), 3),
                exact_match=round(sum(row.exact_match for row in scored) / len(rows), 4),
                execution_match=round(sum(executions) / len(rows), 4) if sql else None,
                rows=scored,
            )
        )
    return scores


def asked_text(row: dict) -> str:
    """What a row asks, in one line of text: its instruction, prompt, or last user message."""
    if "messages" in row:
        return last_content(row["messages"], "user")
    return row.get("instruction") or row.get("prompt") or ""


def _answer_budget(session: Session, rows: list[dict], adapter: str) -> int:
    """Enough new tokens for the longest reference answer, plus slack to see run-on answers fail."""
    references = (session.example(row, adapter)["completion"] for row in rows)
    longest = max(len(session.tokenizer(reference, add_special_tokens=False)["input_ids"]) for reference in references)
    return longest + 8
