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
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from qlora_cli.chat import ROLES, template_of
from qlora_cli.errors import QloraError
from qlora_cli.prompts import IGNORE_INDEX, Renderer, Style, tokenize_example, tokenize_examples  # noqa: F401
from qlora_cli.recipe import TEMPLATE_SUFFIX, DataSection, TrainSection, data_file_problem, is_local

if TYPE_CHECKING:  # datasets and transformers load in seconds; `qlora validate` checks data without them
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


REQUIRED_FIELDS = ("instruction", "output")  # of an alpaca row
# The fields that make a row one format or another, in the order detection tries them: a row with
# instruction/output and also a pre-rendered "text" (tatsu-lab/alpaca has both) is an alpaca row.
FORMAT_FIELDS = {
    "preference": ("chosen", "rejected"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": REQUIRED_FIELDS,
    "text": ("text",),
}
CONVERSATIONAL = ("messages", "sharegpt")
# ShareGPT speakers, as the exports of FastChat, LLaMA-Factory and glaive name them.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
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
    dropped: int  # examples whose whole response fell beyond max_length, or whose conversation was refused
    style: Style  # how the rows were rendered: the adapter records it


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


def row_problem(row: object, data_format: str = "alpaca") -> str | None:
    """Why a row of `data_format` cannot train (None when it can), naming the field."""
    if not isinstance(row, dict):
        return f"expected an object with {'/'.join(FORMAT_FIELDS[data_format])}, got {type(row).__name__}"
    if data_format in CONVERSATIONAL:
        return conversation_problem(row, data_format)
    if data_format == "preference":
        return preference_problem(row)
    if data_format == "prompt_completion" and isinstance(row.get("prompt"), list):
        return "prompt and completion are message lists: write the conversation as one messages list (format: messages)"
    missing = [
        field for field in FORMAT_FIELDS[data_format] if not isinstance(row.get(field), str) or not row[field].strip()
    ]
    if missing:
        needs = {"alpaca": "alpaca rows need instruction and output", "text": "text rows need their text"}
        return f"missing or empty field(s) {', '.join(missing)} ({needs.get(data_format, 'rows need prompt and completion')})"
    if data_format == "alpaca" and row.get("input") is not None and not isinstance(row["input"], str):
        return f"field input must be text, got {type(row['input']).__name__}"
    return None


def preference_problem(row: dict) -> str | None:
    """Why a preference row cannot train: one question (prompt as text or messages, alpaca's instruction and
    input, or TRL's implicit prompt: the beginning chosen and rejected share) and two different answers (text,
    or a message list ending with the assistant's)."""
    row = with_explicit_prompt(row)
    if not _asks(row):
        if all(isinstance(row.get(side), list) and len(row[side]) > 1 for side in ("chosen", "rejected")):
            return (
                "no prompt, and chosen and rejected differ before their last message: give the shared question as "
                "prompt, or begin both with the same messages"
            )
        if all(isinstance(row.get(side), str) for side in ("chosen", "rejected")):
            return (
                "no prompt, and chosen and rejected share no beginning that ends in whitespace to take as one: give "
                "the question as prompt"
            )
        return (
            "missing or empty field prompt (or instruction): a preference row asks a question and gives two "
            "answers, or chosen and rejected begin with the same question"
        )
    if isinstance(row.get("prompt"), list):
        answered = [*row["prompt"], {"role": "assistant", "content": "-"}]
        problem = conversation_problem({"messages": answered, "tools": row.get("tools")}, "messages")
        if problem:
            return f"prompt: {problem}"
    answers = {}
    for side in ("chosen", "rejected"):
        answer = answer_text(row.get(side))
        if answer is None:
            return f"missing or empty field {side} (the {'preferred' if side == 'chosen' else 'worse'} answer)"
        answers[side] = answer
    if answers["chosen"] == answers["rejected"]:
        return "chosen and rejected are the same answer: the pair teaches nothing"
    return None


def _asks(row: dict) -> bool:
    """Whether a preference row states its question: a prompt (text or messages) or alpaca's instruction."""
    prompt, instruction = row.get("prompt"), row.get("instruction")
    return (isinstance(prompt, list) and bool(prompt)) or any(
        isinstance(text, str) and text.strip() for text in (prompt, instruction)
    )


def with_explicit_prompt(row: dict) -> dict:
    """A preference row without a prompt (TRL's implicit prompt: chosen and rejected each hold the whole
    exchange) with the beginning they share moved into prompt: every message before the last, or the shared
    text up to a word boundary. The row itself when it has a question or they share no such beginning."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if _asks(row):
        return row
    if isinstance(chosen, list) and isinstance(rejected, list):
        if len(chosen) == len(rejected) > 1 and chosen[:-1] == rejected[:-1]:
            return {**row, "prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}
    elif isinstance(chosen, str) and isinstance(rejected, str):
        # Up to the last whitespace both share, so that neither answer begins inside a word.
        shared = re.match(r"(?s).*\s", os.path.commonprefix([chosen, rejected]))
        if shared and shared.group(0).strip():
            cut = len(shared.group(0))
            return {**row, "prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
    return row


def answer_text(answer: object) -> str | None:
    """A preference answer's text: the string itself, or the content of the last (assistant) message of a
    list (TRL's conversational preference rows); None when there is none."""
    if isinstance(answer, list) and answer and isinstance(answer[-1], dict):
        if answer[-1].get("role") != "assistant":
            return None
        answer = answer[-1].get("content")
    return answer.strip() if isinstance(answer, str) and answer.strip() else None


def conversation_problem(row: dict, data_format: str) -> str | None:
    """Why a messages or sharegpt row cannot train: each message's role, content and tool calls, and an
    assistant turn to learn. Role order is the template's to judge (Mistral's needs alternation)."""
    key = "messages" if data_format == "messages" else "conversations"
    messages = row.get(key)
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else type(messages).__name__
        return f"{key} must be a list of {{role, content}} messages, got {got}"
    if row.get("tools") is not None and not isinstance(row["tools"], list):
        return f"tools must be a list of tool definitions, got {type(row['tools']).__name__}"
    for index, message in enumerate(messages):
        where = f"{key}[{index}]"
        if data_format == "sharegpt":
            if not isinstance(message, dict) or "from" not in message:
                return f"{where}: expected an object with from and value"
            if message["from"] not in SHAREGPT_ROLES:
                return f"{where}.from: unknown speaker {message['from']!r}; known: {', '.join(SHAREGPT_ROLES)}"
            message = {"role": SHAREGPT_ROLES[message["from"]], "content": message.get("value")}
        if not isinstance(message, dict):
            return f"{where}: expected an object with role and content, got {type(message).__name__}"
        role = message.get("role")
        if role not in ROLES:
            return f"{where}.role: unknown role {role!r}; use one of {', '.join(ROLES)}"
        calls = message.get("tool_calls")
        if calls is not None:
            problem = _tool_calls_problem(calls, f"{where}.tool_calls") if role == "assistant" else None
            if role != "assistant":
                problem = f"{where}.tool_calls: only an assistant message calls tools, not a {role} message"
            if problem:
                return problem
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            return f"{where}.content must be text, got {type(content).__name__}"
        if not (content or "").strip() and not calls:
            return f"{where}: empty {role} message" + (" (nothing to learn)" if role == "assistant" else "")
    if not any(_role(message, data_format) == "assistant" for message in messages):
        return f"{key}: no assistant turn to learn"
    return None


def _role(message: dict, data_format: str) -> str | None:
    return SHAREGPT_ROLES.get(message.get("from")) if data_format == "sharegpt" else message.get("role")


def _tool_calls_problem(calls: object, where: str) -> str | None:
    if not isinstance(calls, list) or not calls:
        return f"{where} must be a non-empty list"
    for index, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            return f"{where}[{index}]: missing function.name"
        if "arguments" not in function:
            return f"{where}[{index}] ({function['name']}): missing function.arguments"
    return None


def normalized(row: dict, data_format: str) -> dict:
    """A checked row in the shape the renderer reads: alpaca fields, prompt/completion, text, or
    {"messages", "tools"} with OpenAI roles and each content stripped (templates such as Llama 3's trim it
    themselves, and a mask must not depend on where a template cut)."""
    if data_format == "preference":
        row = with_explicit_prompt(row)
        prompt = row.get("prompt")
        if isinstance(prompt, list):  # the conversation's tools and row-level system prompt come with it
            asked = normalized({**row, "messages": prompt}, "messages")
        elif isinstance(prompt, str) and prompt.strip():
            asked = {"prompt": prompt}
        else:
            asked = {"instruction": row["instruction"], "input": row.get("input") or ""}
        return {**asked, "chosen": answer_text(row["chosen"]), "rejected": answer_text(row["rejected"])}
    if data_format not in CONVERSATIONAL:
        return row
    source = row["messages"] if data_format == "messages" else row["conversations"]
    messages = []
    if isinstance(row.get("system"), str) and row["system"].strip():  # ShareGPT exports keep it beside the turns
        messages.append({"role": "system", "content": row["system"].strip()})
    for message in source:
        if data_format == "sharegpt":
            message = {"role": SHAREGPT_ROLES[message["from"]], "content": message.get("value")}
        kept = {key: value for key, value in message.items() if value is not None}
        kept["content"] = (message.get("content") or "").strip()
        if kept.get("tool_calls"):
            kept["tool_calls"] = [_parsed_arguments(call) for call in kept["tool_calls"]]
        messages.append(kept)
    return {"messages": messages, **({"tools": row["tools"]} if row.get("tools") else {})}


def _parsed_arguments(call: dict) -> dict:
    """A tool call with its arguments as an object: OpenAI exports hold them as a JSON string, and chat
    templates write them with `tojson`, which would quote that string a second time."""
    function = call.get("function", call)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            return call
        if isinstance(parsed, dict):
            function = {**function, "arguments": parsed}
            return {**call, "function": function} if "function" in call else function
    return call


def detect_format(rows: list, path: str) -> tuple[str, list[str]]:
    """The format of a file's rows (alpaca when no row has any format's fields, so the column checks can say
    which are missing), and a problem when rows fit two formats or differ from each other."""
    first_of: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            continue
        fits = [name for name, fields in FORMAT_FIELDS.items() if all(field in row for field in fields)]
        if len(fits) > 1 and "text" in fits:
            fits.remove("text")
        if len(fits) > 1:
            fields = " and ".join(f"{name} ({'/'.join(FORMAT_FIELDS[name])})" for name in fits)
            return fits[0], [f"{path}: row {number} fits both {fields}; set data.format to the one meant"]
        if fits:
            first_of.setdefault(fits[0], number)
    if len(first_of) > 1:
        listing = ", ".join(f"row {number} is {name}" for name, number in first_of.items())
        return next(iter(first_of)), [
            f"{path} mixes formats ({listing}); a file holds one format: fix or move the odd rows, or set data.format"
        ]
    return next(iter(first_of), "alpaca"), []


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
    @property
    def format(self) -> str | None: ...


@dataclass(frozen=True)
class RowFile:
    """A RowSource for data read on its own: a recipe's eval_path, or `qlora eval --data`."""

    path: str
    split: str = DataSection.model_fields["split"].default
    columns: Mapping[str, str] = field(default_factory=dict)
    max_rows: int | None = None
    invalid_rows: str = DataSection.model_fields["invalid_rows"].default
    format: str | None = None


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
    rows: tuple[dict, ...]  # the rows that can train, normalized (see `normalized`), fields filled from data.columns
    bad: tuple[BadRow, ...]  # every row that cannot train; skipped under data.invalid_rows: drop
    format: str = "alpaca"
    numbers: tuple[int, ...] = ()  # each kept row's number in the file, for messages about it

    def render(self) -> str:
        dropped = f"; {len(self.bad)} would be dropped (data.invalid_rows: drop)" if self.bad else ""
        return (
            f"{self.path}: {len(self.rows)} of {self.total} {self.format} rows can train{dropped}; "
            f"columns {', '.join(self.columns)}"
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
                format=section.format,
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
        if result is not None:
            problems += template_problems(section, rendered_format(result), result.path)
    return CheckedSection(train=checked[0], eval=checked[1] if len(checked) > 1 else None), problems


def rendered_format(checked: CheckedData) -> str:
    """The format whose template renders the rows: a preference row asks its question as messages, as
    alpaca's instruction and input, or as a plain prompt."""
    if checked.format != "preference" or not checked.rows:
        return checked.format
    return _question_format(checked.rows[0])  # _inspect kept only rows that ask as most do


def _question_format(row: dict) -> str:
    """How a normalized preference row asks its question, as the format whose template renders it."""
    return "messages" if "messages" in row else "alpaca" if "instruction" in row else "prompt_completion"


def _one_kind_of_question(rows: list[dict], numbers: list[int]) -> tuple[list[dict], list[int], list[BadRow]]:
    """(the preference rows that ask their question as most rows do, their numbers, the others as bad rows):
    one template renders a file, so its questions are all text, all instructions, or all messages."""
    kinds = {"messages": "messages", "alpaca": "an instruction", "prompt_completion": "a text prompt"}
    counts = Counter(_question_format(row) for row in rows)
    if len(counts) < 2:
        return rows, numbers, []
    most = counts.most_common(1)[0][0]
    kept = [(row, number) for row, number in zip(rows, numbers) if _question_format(row) == most]
    others = [
        BadRow(
            number,
            f"asks its question as {kinds[_question_format(row)]}, while most rows ({counts[most]} of {len(rows)}) ask "
            f"as {kinds[most]}; write every question the same way",
        )
        for row, number in zip(rows, numbers)
        if _question_format(row) != most
    ]
    return [row for row, _ in kept], [number for _, number in kept], others


def template_problems(section: DataSection, data_format: str, path: str) -> list[str]:
    """What data.template and data.task cannot do with rows of `data_format`, said before any tokenizer loads."""
    template = section.template_for(data_format)
    if data_format in CONVERSATIONAL and template in ("alpaca", "none"):
        return [
            f"data.template: {template} renders one prompt and its response; {path} holds conversations "
            f"({data_format}): set data.template: chat (the tokenizer's own) or a .jinja file"
        ]
    if section.task == "reverse" and data_format != "alpaca":
        return [f"data.task: reverse swaps an alpaca row's instruction and output; {path} holds {data_format} rows"]
    if section.system is not None and template in ("alpaca", "none"):
        return [
            f"data.system: {path} holds {data_format} rows, rendered with template {template}, which has no place "
            "for a system prompt; set data.template: chat or a .jinja file"
        ]
    return []


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
    rows = rename_columns(raw, dict(source.columns))
    data_format, problems = (source.format, []) if source.format else detect_format(rows, source.path)
    problems = problems or column_problems(source.path, columns, source.columns, data_format)
    if problems:  # a missing column fails every row: the rows would only repeat it
        return None, problems
    kept, bad, numbers = [], [], []
    for number, row in enumerate(rows, start=1):
        reason = row_problem(row, data_format)
        if reason is None:
            kept.append(normalized(row, data_format))
            numbers.append(number)
        else:
            bad.append(BadRow(number, reason))
    if data_format == "preference":
        kept, numbers, others = _one_kind_of_question(kept, numbers)
        bad = sorted([*bad, *others], key=lambda row: row.number)
    checked = CheckedData(
        path=source.path,
        columns=columns,
        total=len(rows),
        rows=tuple(kept),
        bad=tuple(bad),
        format=data_format,
        numbers=tuple(numbers),
    )
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


def column_problems(
    path: str, columns: tuple[str, ...], mapping: Mapping[str, str], data_format: str = "alpaca"
) -> list[str]:
    """data.columns against the file's own columns: each mapped column must exist, and the format's fields
    must come from somewhere. Each problem says what the file has and, where one is close, which column was meant."""
    problems = []
    listing = f"its columns: {', '.join(columns) or 'none'}"
    for format_field, column in mapping.items():
        if column not in columns:
            close = difflib.get_close_matches(column, columns, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"data.columns.{format_field}: {path} has no column {column!r}{hint} ({listing})")
    for format_field in FORMAT_FIELDS[data_format]:
        if format_field in mapping or format_field in columns:
            continue
        unmapped = [column for column in columns if column not in mapping.values()]
        guess = next((column for column in USUAL_COLUMNS.get(format_field, ()) if column in unmapped), None)
        guess = guess or next(iter(difflib.get_close_matches(format_field, unmapped, n=1, cutoff=0.6)), None)
        fix = f"--set data.columns.{format_field}={guess or 'COLUMN'}"
        problems.append(
            f"{path} has no {format_field!r} column ({listing}); name the column that holds it: {fix}"
            + ("" if guess else f", or set data.format ({', '.join(FORMAT_FIELDS)})")
        )
    return problems


def build_dataset(
    section: DataSection,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = DEFAULT_SEED,
    checked: CheckedSection | None = None,
    model_name: str = "the model",
    style: Style | None = None,
) -> TrainingData:
    """Rows -> tokenized training (and evaluation) examples. `seed` (train.seed) picks the eval_fraction hold-out;
    `checked` is check_section's result when the caller has already read the rows. Every conversation is
    rendered and its mask checked here, before any weights load: a row the template refuses, or whose assistant
    turn has no end-of-turn token, is named by its row number. `style` overrides the data section's (an
    adapter continued by lora.init_from is prompted as it was trained). Preference rows become prompt_ids,
    chosen_ids and rejected_ids (TRL's DPO columns), rendered exactly as a supervised example would be."""
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
    style = style or resolve_style(section, rendered_format(checked.train), tokenizer, model_name)
    renderer = Renderer(style, tokenizer)
    rows = list(zip(checked.train.numbers or range(1, len(checked.train.rows) + 1), checked.train.rows))
    eval_rows = list(zip(checked.eval.numbers, checked.eval.rows)) if checked.eval is not None else None
    if section.eval_path is None and section.eval_fraction > 0:
        rows, eval_rows = hold_out(rows, section.eval_fraction, seed)
    train, dropped = _tokenize_rows(rows, section, renderer, "training", checked.train.path)
    evaluation = None
    if eval_rows:
        evaluation = _tokenize_rows(
            eval_rows, section, renderer, "evaluation", checked.eval.path if checked.eval else checked.train.path
        )[0]
    return TrainingData(train=train, eval=evaluation, dropped=dropped, style=style)


def resolve_style(section: DataSection, data_format: str, tokenizer: PreTrainedTokenizerBase, model_name: str) -> Style:
    """The Style rows of `data_format` train with: data.template (or the format's own), its Jinja text read
    now and kept, data.system and data.task."""
    template = section.template_for(data_format)
    if template == "chat":
        style = Style(template="chat", template_text=template_of(tokenizer, model_name).source, system=section.system)
    elif template.endswith(TEMPLATE_SUFFIX):
        style = Style(template=Path(template).name, template_text=_read_text(Path(template)), system=section.system)
    else:
        style = Style(template=template, task=section.task)
    return style


def hold_out(rows: list, fraction: float, seed: int) -> tuple[list, list]:
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
    rows: list[tuple[int, dict]], section: DataSection, renderer: Renderer, what: str, path: str
) -> tuple[Dataset, int]:
    """Tokenize (row number, row) pairs; one QloraError names every row whose conversation cannot train."""
    from datasets import Dataset

    preference = bool(rows) and "chosen" in rows[0][1]
    fields = ("prompt_ids", "chosen_ids", "rejected_ids") if preference else ("input_ids", "labels")

    def tokenize_batch(batch: dict) -> dict:
        columns: dict[str, list] = {field: [] for field in (*fields, "problem")}
        for text in batch["row"]:
            row, problem = json.loads(text), ""
            try:
                if preference:
                    example = renderer.preference(row)
                else:
                    example = renderer.example(row, train_on=section.train_on, max_length=section.max_length)
            except QloraError as error:
                example, problem = dict.fromkeys(fields, []), str(error)
            for name in fields:
                columns[name].append(example[name])
            columns["problem"].append(problem)
        return columns

    workers = min(os.cpu_count() or 1, 8) if len(rows) >= 20_000 else None
    columns = {"row": [json.dumps(row) for _, row in rows], "number": [number for number, _ in rows]}
    dataset = Dataset.from_dict(columns).map(
        tokenize_batch, batched=True, num_proc=workers, remove_columns=["row"], desc=f"Tokenizing {what} data"
    )
    refused = [BadRow(number, problem) for number, problem in zip(dataset["number"], dataset["problem"]) if problem]
    if refused and (section.invalid_rows == "fail" or len(refused) == len(rows)):
        if len(refused) == 1:
            raise QloraError(f"{path}: {refused[0]}")
        raise QloraError(f"{path}: {len(refused)} of {len(rows)} rows cannot train:" + listed_rows(refused))
    if refused:
        log.warning(
            "data.invalid_rows: dropping %d of %d rows of %s (first: %s)", len(refused), len(rows), path, refused[0]
        )
        dataset = dataset.filter(lambda problem: not problem, input_columns="problem")
    dataset = dataset.remove_columns(["problem", "number"])
    if preference:  # TRL cuts each pair to max_length; a prompt that fills it leaves nothing to compare
        keep = [len(prompt) < section.max_length for prompt in dataset["prompt_ids"]]
    else:
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
    return dataset, cut_off + len(refused)
