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
from rich.table import Table

from qlora_cli.data import IGNORE_INDEX, check_rows, read_rows, tokenize_example
from qlora_cli.errors import QloraError
from qlora_cli.generate import BASE, MIX, Sampling, Session, open_session, parse_mix
from qlora_cli.recipe import local_or_hub


@dataclass(frozen=True)
class Score:
    """One adapter's figures on the held-out rows."""

    adapter: str
    examples: int
    loss: float  # mean cross-entropy per response token
    perplexity: float
    exact_match: float  # share of greedy answers equal to the reference
    execution_match: float | None = None  # share of SQL answers returning the reference's rows (--sql)

    def as_dict(self) -> dict:
        fields = {
            "adapter": self.adapter,
            "examples": self.examples,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "exact_match": self.exact_match,
        }
        if self.execution_match is not None:
            fields["execution_match"] = self.execution_match
        return fields


@dataclass(frozen=True)
class Evaluation:
    data: str  # as given on the command line
    base_id: str
    mix: str | None  # the --mix spec, scored under the adapter name 'mix'
    sql: bool
    scores: tuple[Score, ...]


def exact_match(
    session: Session, rows: list[dict], adapter: str, sampling: Sampling | None = None
) -> tuple[float, list[str]]:
    """Share of answers (greedy unless `sampling` says otherwise) equal to the reference completion, and the answers."""
    answers = session.ask(rows, adapter, sampling or Sampling())
    hits = sum(answer == session.example(row, adapter)["completion"].strip() for answer, row in zip(answers, rows))
    return hits / len(rows), answers


def response_loss(session: Session, rows: list[dict], adapter: str, batch_size: int = 16) -> float:
    """Mean cross-entropy per response token (EOS included), the loss training reports."""
    examples = []
    for row in rows:
        rendered = session.example(row, adapter)
        examples.append(tokenize_example(rendered["prompt"], rendered["completion"], session.tokenizer, 100_000))
    total, count = 0.0, 0
    model = session.model
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        pad = session.tokenizer.pad_token_id
        input_ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in chunk])
        labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in chunk])
        attention = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in chunk])
        with torch.inference_mode(), session.using(adapter):
            logits = model(
                input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)
            ).logits.float()
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
    """Command `eval`: score the base and each adapter (and the mix) on held-out rows; `out` also gets JSON."""
    data_path = local_or_hub(data, Path.cwd())  # a file relative to here, or a hub dataset id
    if data_path is None:
        raise QloraError(f"--data: file not found: {data}")
    weights = parse_mix(mix) if mix else None
    session = open_session(adapter_refs, mix=weights, base=base, home=home)
    names = [ref if ref == BASE else Path(ref).name for ref in adapter_refs] + ([MIX] if mix else [])
    scores = score(session, data_path, names, sql=sql, max_rows=max_rows)
    if out is not None:
        results = [result.as_dict() for result in scores]
        out.write_text(json.dumps({"data": data_path, "base": session.base_id, "results": results}, indent=2) + "\n")
    return Evaluation(data=data, base_id=session.base_id, mix=mix, sql=sql, scores=tuple(scores))


def render(evaluation: Evaluation) -> Table:
    table = Table(title=f"{evaluation.data} on {evaluation.base_id}")
    columns = ["adapter", "examples", "loss", "perplexity", "exact match"] + (
        ["execution match"] if evaluation.sql else []
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
    return table


def score(
    session: Session, data_path: str, adapters: list[str], *, sql: bool = False, max_rows: int | None = None
) -> list[Score]:
    rows = read_rows(data_path, split="test", max_rows=max_rows)
    check_rows(rows, data_path)
    scores = []
    for adapter in adapters:
        loss = response_loss(session, rows, adapter)
        accuracy, answers = exact_match(
            session, rows, adapter, Sampling(max_new_tokens=_answer_budget(session, rows, adapter))
        )
        execution = None
        if sql:
            matches = [
                sql_execution_match(row.get("input") or "", row["output"], answer, row["instruction"])
                for row, answer in zip(rows, answers)
            ]
            execution = round(sum(matches) / len(rows), 4)
        scores.append(
            Score(
                adapter=adapter,
                examples=len(rows),
                loss=round(loss, 4),
                perplexity=round(math.exp(loss), 3),
                exact_match=round(accuracy, 4),
                execution_match=execution,
            )
        )
    return scores


def _answer_budget(session: Session, rows: list[dict], adapter: str) -> int:
    """Enough new tokens for the longest reference answer, plus slack to see run-on answers fail."""
    references = (session.example(row, adapter)["completion"] for row in rows)
    longest = max(len(session.tokenizer(reference, add_special_tokens=False)["input_ids"]) for reference in references)
    return longest + 8
