"""Stage `data`: read rows, check them, render prompts, tokenize with a response-only loss mask.

We tokenize ourselves rather than let the trainer do it, so that the loss mask is ours to show
(`--dry-run`), EOS is always a label (even when pad = EOS), and a response cut off by
`max_length` is counted instead of silently training on nothing.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, load_dataset
from transformers import PreTrainedTokenizerBase

from qlora_cli.errors import QloraError
from qlora_cli.prompts import render_example
from qlora_cli.recipe import DataSection, is_local

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens)
REQUIRED_FIELDS = ("instruction", "output")


@dataclass(frozen=True)
class TrainingData:
    train: Dataset
    eval: Dataset | None
    dropped: int  # examples whose whole response fell beyond max_length


def rename_columns(rows: list[dict], columns: dict[str, str]) -> list[dict]:
    """Map a dataset's own column names onto the alpaca fields (data.columns)."""
    if not columns:
        return rows
    return [{**row, **{field: row.get(column) for field, column in columns.items()}} if isinstance(row, dict) else row for row in rows]


def read_rows(path: str, *, split: str = "train", max_rows: int | None = None) -> list[dict]:
    """Rows from a local .jsonl/.json/.csv/.parquet file or a hub dataset split."""
    if is_local(path):
        suffix = Path(path).suffix.lower()
        if suffix == ".jsonl":
            rows = read_jsonl(Path(path))
        elif suffix == ".json":
            rows = _read_json(Path(path))
        elif suffix in (".csv", ".parquet"):
            rows = load_dataset(suffix[1:], data_files=path, split="train").to_list()
        else:
            raise QloraError(f"data.path: {path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    else:
        try:
            rows = load_dataset(path, split=split).to_list()
        except Exception as error:  # offline, missing, gated or mistyped ids all land here
            raise QloraError(f"data.path: cannot load hub dataset {path!r} (split {split!r}): {type(error).__name__}: {error}") from None
    if max_rows is not None:
        rows = rows[:max_rows]
    if not rows:
        raise QloraError(f"data.path: {path} has no rows")
    return rows


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise QloraError(f"{path}: not UTF-8: invalid byte 0x{raw[error.start]:02x} at byte offset {error.start}") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise QloraError(f"{path}: line {number}: malformed JSON: {error.msg} (column {error.colno})") from None
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise QloraError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise QloraError(f"{path}: expected a list of rows (or {{'data': [...]}})")
    return data


def check_rows(rows: list[dict], source: str) -> None:
    """Every row must be an object with non-empty string instruction and output; input is optional."""
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise QloraError(f"{source}: row {number}: expected an object with instruction/input/output, got {type(row).__name__}")
        missing = [field for field in REQUIRED_FIELDS if not isinstance(row.get(field), str) or not row[field].strip()]
        if missing:
            raise QloraError(f"{source}: row {number}: missing or empty field(s) {', '.join(missing)} (alpaca rows need instruction and output)")
        if row.get("input") is not None and not isinstance(row["input"], str):
            raise QloraError(f"{source}: row {number}: field input must be text, got {type(row['input']).__name__}")


def tokenize_example(prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    """Prompt tokens are context only (label -100); the completion and its EOS are what the model learns."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def build_dataset(section: DataSection, tokenizer: PreTrainedTokenizerBase) -> TrainingData:
    rows = rename_columns(read_rows(section.path, split=section.split, max_rows=section.max_rows), section.columns)
    check_rows(rows, section.path)
    eval_rows: list[dict] | None = None
    if section.eval_path is not None:
        eval_source = section.eval_path if is_local(section.eval_path) else section.path
        eval_split = "train" if is_local(section.eval_path) else section.eval_path
        eval_rows = rename_columns(read_rows(eval_source, split=eval_split), section.columns)
        check_rows(eval_rows, section.eval_path)
    elif section.eval_fraction > 0:
        held_out = max(1, int(len(rows) * section.eval_fraction))
        rows, eval_rows = rows[:-held_out], rows[-held_out:]
    train, dropped = _tokenize_rows(rows, section, tokenizer, "training")
    evaluation = _tokenize_rows(eval_rows, section, tokenizer, "evaluation")[0] if eval_rows else None
    return TrainingData(train=train, eval=evaluation, dropped=dropped)


def _tokenize_rows(rows: list[dict], section: DataSection, tokenizer: PreTrainedTokenizerBase, what: str) -> tuple[Dataset, int]:
    columns = {field: [str(row.get(field) or "") for row in rows] for field in ("instruction", "input", "output")}

    def tokenize_batch(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": []}
        for instruction, context, output in zip(batch["instruction"], batch["input"], batch["output"]):
            example = render_example({"instruction": instruction, "input": context, "output": output}, section.template, section.task)
            tokens = tokenize_example(example["prompt"], example["completion"], tokenizer, section.max_length)
            out["input_ids"].append(tokens["input_ids"])
            out["labels"].append(tokens["labels"])
        return out

    workers = min(os.cpu_count() or 1, 8) if len(rows) >= 20_000 else None
    dataset = Dataset.from_dict(columns).map(
        tokenize_batch, batched=True, num_proc=workers, remove_columns=list(columns), desc=f"Tokenizing {what} data"
    )
    keep = [any(label != IGNORE_INDEX for label in labels) for labels in dataset["labels"]]
    cut_off = keep.count(False)
    if cut_off:
        where = f"{cut_off} of {len(keep)} {what} examples (first: row {keep.index(False) + 1})"
        if section.truncated == "fail":
            raise QloraError(
                f"data.max_length: {where} have their whole response beyond {section.max_length} tokens; "
                "raise data.max_length or set data.truncated: drop"
            )
        log.warning("data.max_length: dropping %s whose whole response lies beyond %d tokens", where, section.max_length)
        dataset = dataset.select([index for index, kept in enumerate(keep) if kept])
        if len(dataset) == 0:
            raise QloraError(f"data.max_length: no {what} example keeps any response token at {section.max_length} tokens")
    return dataset, cut_off
