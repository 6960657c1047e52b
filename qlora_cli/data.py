"""Stage `data`: read rows, check them, render prompts, tokenize with a response-only loss mask.

We tokenize ourselves rather than let the trainer do it, so that the loss mask is ours to show
(`--dry-run`), EOS is always a label (even when pad = EOS), and a response cut off by
`max_length` is counted instead of silently training on nothing. Prompt and completion are
tokenized together, and the model learns the tokens that follow the prompt's own: the ones it
must produce after `generate` feeds it that prompt.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from qlora_cli.errors import QloraError
from qlora_cli.prompts import render_example
from qlora_cli.recipe import DataSection, TrainSection, data_file_problem, is_local

if TYPE_CHECKING:  # datasets and transformers load in seconds; `qlora validate` checks data without them
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens)
REQUIRED_FIELDS = ("instruction", "output")
# Column names datasets commonly use for the alpaca fields: the first guess when a file lacks the field itself.
USUAL_COLUMNS = {
    "instruction": ("question", "prompt", "query", "instruction_text", "text"),
    "input": ("context", "input_text"),
    "output": ("answer", "response", "completion", "target", "output_text"),
}
SHOWN_ROWS = 5  # bad rows an error lists; its count covers the rest
DEFAULT_SEED: int = TrainSection.model_fields["seed"].default  # train.seed's default; the schema stays its only home


@dataclass(frozen=True)
class TrainingData:
    train: Dataset
    eval: Dataset | None
    dropped: int  # examples whose whole response fell beyond max_length


def rename_columns(rows: list[dict], columns: dict[str, str]) -> list[dict]:
    """Map a dataset's own column names onto the alpaca fields (data.columns)."""
    if not columns:
        return rows
    return [
        {**row, **{field: row.get(column) for field, column in columns.items()}} if isinstance(row, dict) else row
        for row in rows
    ]


def read_rows(path: str, *, split: str = "train", max_rows: int | None = None) -> list[dict]:
    """Rows from a local .jsonl/.json/.csv/.parquet file or a hub dataset split. `datasets` (and pyarrow) load
    only for csv, parquet and the hub: `qlora validate` of a JSONL recipe stays quick."""
    if is_local(path):
        problem = data_file_problem(path, "data.path")
        if problem:
            raise QloraError(problem)
        suffix = Path(path).suffix.lower()
        if suffix == ".jsonl":
            rows = read_jsonl(Path(path))
        elif suffix == ".json":
            rows = _read_json(Path(path))
        else:
            from datasets import load_dataset

            rows = load_dataset(suffix[1:], data_files=path, split="train").to_list()
    else:
        from datasets import load_dataset

        try:
            rows = load_dataset(path, split=split).to_list()
        except Exception as error:  # offline, missing, gated or mistyped ids all land here
            raise QloraError(
                f"data.path: cannot load hub dataset {path!r} (split {split!r}): {type(error).__name__}: {error}"
            ) from None
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
        raise QloraError(
            f"{path}: not UTF-8: invalid byte 0x{raw[error.start]:02x} at byte offset {error.start}"
        ) from None


def read_jsonl(path: Path) -> list[dict]:
    return [row for _, row in numbered_jsonl(path)]


def numbered_jsonl(path: Path) -> list[tuple[int, object]]:
    """(line number, value) of each non-blank line: the number an editor shows, for messages about a row."""
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
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


def row_problem(row: object) -> str | None:
    """Why a row cannot train (None when it can): it must be an object with non-empty string instruction
    and output; input is optional text."""
    if not isinstance(row, dict):
        return f"expected an object with instruction/input/output, got {type(row).__name__}"
    missing = [field for field in REQUIRED_FIELDS if not isinstance(row.get(field), str) or not row[field].strip()]
    if missing:
        return f"missing or empty field(s) {', '.join(missing)} (alpaca rows need instruction and output)"
    if row.get("input") is not None and not isinstance(row["input"], str):
        return f"field input must be text, got {type(row['input']).__name__}"
    return None


class RowSource(Protocol):
    """What check_data reads: a DataSection, or any object with these fields (RowFile for a file read alone)."""

    @property
    def path(self) -> str: ...
    @property
    def split(self) -> str: ...
    @property
    def columns(self) -> Mapping[str, str]: ...
    @property
    def max_rows(self) -> int | None: ...
    @property
    def invalid_rows(self) -> str: ...


@dataclass(frozen=True)
class RowFile:
    """A RowSource for data read on its own: a recipe's eval_path, or `qlora eval --data`."""

    path: str
    split: str = DataSection.model_fields["split"].default
    columns: Mapping[str, str] = field(default_factory=dict)
    max_rows: int | None = None
    invalid_rows: str = DataSection.model_fields["invalid_rows"].default


@dataclass(frozen=True)
class BadRow:
    number: int  # 1-based, in file order (a JSONL file's line number when it has no blank lines)
    reason: str

    def __str__(self) -> str:
        return f"row {self.number}: {self.reason}"


@dataclass(frozen=True)
class CheckedData:
    """One data source read and checked, before any tokenizer or weights: what validate prints and
    build_dataset tokenizes."""

    path: str
    columns: tuple[str, ...]  # the file's own columns, in the order they first appear
    total: int  # rows read (after data.max_rows)
    rows: tuple[dict, ...]  # the rows that can train, alpaca fields filled from data.columns
    bad: tuple[BadRow, ...]  # every row that cannot train; skipped under data.invalid_rows: drop

    def render(self) -> str:
        dropped = f"; {len(self.bad)} would be dropped (data.invalid_rows: drop)" if self.bad else ""
        return (
            f"{self.path}: {len(self.rows)} of {self.total} rows can train{dropped}; columns {', '.join(self.columns)}"
        )


@dataclass(frozen=True)
class CheckedSection:
    """The data section's sources, checked together."""

    train: CheckedData | None  # None: a hub dataset left unread (validate downloads nothing)
    eval: CheckedData | None  # None: no eval_path, or a hub split left unread


def check_data(source: RowSource) -> CheckedData:
    """Read every row of one source and check it; one QloraError lists every problem (see check_section)."""
    checked, problems = _inspect(source)
    _raise_problems(problems)
    return checked


def check_section(section: DataSection, *, read_hub: bool = True) -> CheckedSection:
    """Every check `train` makes on its data before a tokenizer or weights are loaded: the files exist and have a
    supported format, data.columns names columns the file has, every row can train. One QloraError lists the
    problems of the training and evaluation data together. `read_hub=False` leaves hub datasets unread."""
    checked, problems = inspect_section(section, read_hub=read_hub)
    _raise_problems(problems)
    return checked


def inspect_section(section: DataSection, *, read_hub: bool = True) -> tuple[CheckedSection, list[str]]:
    """check_section's result and the problems it would raise, for a caller that reports more (validate)."""
    sources = [section]
    if section.eval_path is not None:
        local_eval = is_local(section.eval_path)
        sources.append(
            RowFile(
                path=section.eval_path if local_eval else section.path,
                split="train" if local_eval else section.eval_path,
                columns=section.columns,
                invalid_rows=section.invalid_rows,
            )
        )
    checked: list[CheckedData | None] = []
    problems: list[str] = []
    for source in sources:
        if not read_hub and not is_local(source.path):
            checked.append(None)
            continue
        result, found = _inspect(source)
        checked.append(result)
        problems += found
    return CheckedSection(train=checked[0], eval=checked[1] if len(checked) > 1 else None), problems


def _raise_problems(problems: list[str]) -> None:
    if len(problems) == 1:
        raise QloraError(problems[0])
    if problems:
        raise QloraError(f"data: {len(problems)} problems\n" + "\n".join(f"  {problem}" for problem in problems))


def _inspect(source: RowSource) -> tuple[CheckedData | None, list[str]]:
    """(the checked data, the problems found). A file that cannot be read at all is one problem."""
    try:
        raw = read_rows(source.path, split=source.split, max_rows=source.max_rows)
    except QloraError as error:
        return None, [str(error)]
    columns = tuple(dict.fromkeys(key for row in raw if isinstance(row, dict) for key in row))
    problems = column_problems(source.path, columns, source.columns)
    if problems:  # a missing column fails every row: the rows would only repeat it
        return None, problems
    rows = rename_columns(raw, dict(source.columns))
    kept, bad = [], []
    for number, row in enumerate(rows, start=1):
        reason = row_problem(row)
        if reason is None:
            kept.append(row)
        else:
            bad.append(BadRow(number, reason))
    checked = CheckedData(path=source.path, columns=columns, total=len(rows), rows=tuple(kept), bad=tuple(bad))
    if not bad:
        return checked, []
    if source.invalid_rows == "drop":
        if kept:
            return checked, []
        return checked, [
            f"{source.path}: none of its {len(rows)} rows can train (first: {bad[0]}); check data.path and data.columns"
        ]
    fix = "fix the row, or set data.invalid_rows: drop to skip such rows"
    if len(bad) == 1:
        return checked, [f"{source.path}: {bad[0]}; {fix}"]
    return checked, [
        f"{source.path}: {len(bad)} of {len(rows)} rows cannot train; {fix.replace('the row', 'them')}:"
        + listed_rows(bad)
    ]


def listed_rows(bad: tuple[BadRow, ...] | list[BadRow]) -> str:
    """The first SHOWN_ROWS bad rows, one indented line each, and how many more there are."""
    listed = "".join(f"\n    {row}" for row in bad[:SHOWN_ROWS])
    return listed + (f"\n    ... and {len(bad) - SHOWN_ROWS} more" if len(bad) > SHOWN_ROWS else "")


def column_problems(path: str, columns: tuple[str, ...], mapping: Mapping[str, str]) -> list[str]:
    """data.columns against the file's own columns: each mapped column must exist, and instruction and output
    must come from somewhere. Each problem says what the file has and, where one is close, which column was meant."""
    problems = []
    listing = f"its columns: {', '.join(columns) or 'none'}"
    for alpaca_field, column in mapping.items():
        if column not in columns:
            close = difflib.get_close_matches(column, columns, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"data.columns.{alpaca_field}: {path} has no column {column!r}{hint} ({listing})")
    for alpaca_field in REQUIRED_FIELDS:
        if alpaca_field in mapping or alpaca_field in columns:
            continue
        unmapped = [column for column in columns if column not in mapping.values()]
        guess = next((column for column in USUAL_COLUMNS[alpaca_field] if column in unmapped), None)
        guess = guess or next(iter(difflib.get_close_matches(alpaca_field, unmapped, n=1, cutoff=0.6)), None)
        fix = f"--set data.columns.{alpaca_field}={guess or 'COLUMN'}"
        problems.append(f"{path} has no {alpaca_field!r} column ({listing}); name the column that holds it: {fix}")
    return problems


def tokenize_example(prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    """Prompt tokens are context only (label -100); the completion and its EOS are what the model learns."""
    return tokenize_examples([prompt], [completion], tokenizer, max_length)[0]


def tokenize_examples(
    prompts: list[str], completions: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[dict]:
    """Tokenize prompt + completion together and learn what follows the prompt's own tokens.

    The prompt's ids are taken as `generate` makes them (add_special_tokens=True: BOS where the tokenizer adds
    one), and the completion's are the ids that follow them in the joint tokenization: exactly what the model
    must produce after that prompt at inference. Tokenizing the completion alone would differ: SentencePiece
    puts '▁' in front of text that starts a string ('▁SE LECT' where the joint text gives 'SELECT').
    """
    prompt_batch = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    joint_batch = tokenizer(
        [prompt + completion for prompt, completion in zip(prompts, completions)], add_special_tokens=True
    )["input_ids"]
    examples = []
    for prompt, completion, prompt_ids, joint_ids in zip(prompts, completions, prompt_batch, joint_batch):
        if joint_ids[: len(prompt_ids)] == prompt_ids:
            context, response = prompt_ids, joint_ids[len(prompt_ids) :]
        else:
            context, response = _split_merged_boundary(prompt, completion, prompt_ids, joint_ids, tokenizer)
        response = response + [tokenizer.eos_token_id]  # always a label, also when pad = EOS
        examples.append(
            {
                "input_ids": (context + response)[:max_length],
                "labels": ([IGNORE_INDEX] * len(context) + response)[:max_length],
            }
        )
    return examples


def _split_merged_boundary(
    prompt: str, completion: str, prompt_ids: list[int], joint_ids: list[int], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    r"""(context, response) when a joint token straddles the prompt's end, e.g. tekken (byte-level BPE)
    merging the prompt's final ':\n' with a completion's leading '\n' into one ':\n\n' token.

    Generate feeds the prompt's own ids, so we keep them as the context and learn the completion as it
    continues from there: the completion's characters inside the straddling token, tokenized alone, then
    the joint tokens that start at or after the boundary. That split is taken only if it decodes to the
    same text as the joint tokenization: tokenized alone, a SentencePiece fragment gains a spurious '▁'
    (the very defect this module avoids). Otherwise the joint tokens are kept whole and learning starts
    where they part from the prompt's tokens: every completion character is learned, and so is the piece
    of prompt that the merge re-cut (usually one token), which generate's prompt ids cut differently.
    """
    if getattr(tokenizer, "is_fast", False):  # offsets need a fast tokenizer
        offsets = tokenizer(prompt + completion, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
        boundary = len(prompt)
        after = next(
            (index for index, (start, end) in enumerate(offsets) if start >= boundary and end > start), len(offsets)
        )
        gap_end = offsets[after][0] - boundary if after < len(offsets) else len(completion)
        gap_ids = tokenizer(completion[:gap_end], add_special_tokens=False)["input_ids"] if gap_end > 0 else []
        response = gap_ids + joint_ids[after:]
        if tokenizer.decode(prompt_ids + response) == tokenizer.decode(joint_ids):
            return prompt_ids, response
    shared = next(
        (index for index, (a, b) in enumerate(zip(prompt_ids, joint_ids)) if a != b),
        min(len(prompt_ids), len(joint_ids)),
    )
    return joint_ids[:shared], joint_ids[shared:]


def build_dataset(
    section: DataSection,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = DEFAULT_SEED,
    checked: CheckedSection | None = None,
) -> TrainingData:
    """Rows -> tokenized training (and evaluation) examples. `seed` (train.seed) picks the eval_fraction hold-out;
    `checked` is check_section's result when the caller has already read the rows."""
    checked = checked or check_section(section)
    assert checked.train is not None  # check_section reads hub data unless told not to
    for data in (checked.train, checked.eval):
        if data is not None and data.bad:
            log.warning(
                "data.invalid_rows: dropping %d of %d rows of %s (first: %s)",
                len(data.bad),
                data.total,
                data.path,
                data.bad[0],
            )
    rows = list(checked.train.rows)
    eval_rows: list[dict] | None = list(checked.eval.rows) if checked.eval is not None else None
    if section.eval_path is None and section.eval_fraction > 0:
        rows, eval_rows = hold_out(rows, section.eval_fraction, seed)
    train, dropped = _tokenize_rows(rows, section, tokenizer, "training")
    evaluation = _tokenize_rows(eval_rows, section, tokenizer, "evaluation")[0] if eval_rows else None
    return TrainingData(train=train, eval=evaluation, dropped=dropped)


def hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded random sample of the rows is held out, each side in file order. Hub datasets
    are often sorted (by source, length or date), so their tail is no fair sample of the rest."""
    held_out = max(1, int(len(rows) * fraction))
    if held_out >= len(rows):
        raise QloraError(
            f"data.eval_fraction: holding out {held_out} of {len(rows)} rows leaves none to train on; lower it or set data.eval_path"
        )
    chosen = set(random.Random(seed).sample(range(len(rows)), held_out))
    return [row for index, row in enumerate(rows) if index not in chosen], [
        row for index, row in enumerate(rows) if index in chosen
    ]


def _tokenize_rows(
    rows: list[dict], section: DataSection, tokenizer: PreTrainedTokenizerBase, what: str
) -> tuple[Dataset, int]:
    from datasets import Dataset

    columns = {field: [str(row.get(field) or "") for row in rows] for field in ("instruction", "input", "output")}

    def tokenize_batch(batch: dict) -> dict:
        rendered = [
            render_example(
                {"instruction": instruction, "input": context, "output": output}, section.template, section.task
            )
            for instruction, context, output in zip(batch["instruction"], batch["input"], batch["output"])
        ]
        examples = tokenize_examples(
            [r["prompt"] for r in rendered], [r["completion"] for r in rendered], tokenizer, section.max_length
        )
        return {
            "input_ids": [example["input_ids"] for example in examples],
            "labels": [example["labels"] for example in examples],
        }

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
        log.warning(
            "data.max_length: dropping %s whose whole response lies beyond %d tokens", where, section.max_length
        )
        dataset = dataset.select([index for index, kept in enumerate(keep) if kept])
        if len(dataset) == 0:
            raise QloraError(
                f"data.max_length: no {what} example keeps any response token at {section.max_length} tokens"
            )
    return dataset, cut_off
