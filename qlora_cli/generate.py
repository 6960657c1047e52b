"""Command `generate`: one 4-bit base in memory, any number of named adapters on top.

Each adapter is loaded under its own name beside the others, so switching is `set_adapter`, the
base alone is the adapters disabled, and a weighted mix is one more adapter built by peft's
`add_weighted_adapter`. Prompts are rendered by the same function training used.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer, set_seed

from qlora_cli import adapters
from qlora_cli.adapters import AdapterRecord, check_one_base
from qlora_cli.errors import QloraError
from qlora_cli.model import check_device, fingerprint_weights, load_model, load_tokenizer, resolve_model_dir
from qlora_cli.prompts import DEFAULT_TASK, DEFAULT_TEMPLATE, render_example
from qlora_cli.recipe import RESERVED_ADAPTER_NAMES, ModelSection

log = logging.getLogger(__name__)

BASE, MIX = RESERVED_ADAPTER_NAMES  # the base model alone; a weighted combination (--mix)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy: reproducible, and what exact-match evaluation wants
    top_p: float = 1.0
    seed: int = 0

    def generate_kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
        }


@dataclass
class Session:
    """A loaded base with its adapters; `names` lists what `ask` accepts ('none' included)."""

    model: PreTrainedModel | PeftModel
    tokenizer: PreTrainedTokenizerBase
    base_id: str
    templates: dict[str, str] = field(default_factory=dict)
    tasks: dict[str, str] = field(default_factory=dict)  # "forward" or "reverse", as each adapter was trained

    @property
    def names(self) -> list[str]:
        return [BASE, *self.templates]

    def style(self, adapter: str) -> tuple[str, str]:
        """The template and task that `adapter` is prompted with: its own, as trained. The base has none
        of its own and borrows the first adapter's, so that the two answer the same question."""
        owner = adapter if adapter in self.templates else next(iter(self.templates), None)
        return self.templates.get(owner, DEFAULT_TEMPLATE), self.tasks.get(owner, DEFAULT_TASK)

    def ask(self, rows: list[dict], adapter: str, sampling: Sampling = Sampling(), batch_size: int = 16) -> list[str]:
        """Answers for alpaca rows ({instruction, input}) from one adapter, in batches."""
        answers: list[str] = []
        for start in range(0, len(rows), batch_size):
            prompts = [self.prompt(row, adapter) for row in rows[start : start + batch_size]]
            answers += self._generate(prompts, adapter, sampling)
        return answers

    @contextlib.contextmanager
    def using(self, adapter: str) -> Iterator[None]:
        """Route the model through one adapter, or around all of them for the base."""
        if adapter not in self.names:
            raise QloraError(f"adapter {adapter!r} is not loaded; loaded: {', '.join(self.names)}")
        if isinstance(self.model, PeftModel) and adapter == BASE:
            with self.model.disable_adapter():
                yield
            return
        if isinstance(self.model, PeftModel):
            self.model.set_adapter(adapter)
        yield

    def example(self, row: dict, adapter: str) -> dict[str, str]:
        """The prompt and expected completion, rendered as the adapter was trained."""
        template, task = self.style(adapter)
        if task == "reverse" and "output" not in row:
            row = {
                "instruction": "",
                "output": row["instruction"],
            }  # generate: the text given is the response to reverse
        return render_example({"output": "", **row}, template, task)

    def prompt(self, row: dict, adapter: str) -> str:
        return self.example(row, adapter)["prompt"]

    def add_mix(self, weights: dict[str, float], name: str = MIX) -> None:
        """One more adapter: the weighted combination of loaded ones, prompted as its first member."""
        unknown = [adapter for adapter in weights if adapter not in self.templates]
        if unknown:
            raise QloraError(f"--mix names {unknown}, which are not loaded adapters")
        # 'cat' stacks the adapters' low-rank factors, so the mix's update is exactly sum(w_i * B_i A_i),
        # and it works across different ranks (peft's 'linear' needs equal ranks and mixes A and B separately).
        self.model.add_weighted_adapter(
            list(weights), list(weights.values()), adapter_name=name, combination_type="cat"
        )
        self.templates[name], self.tasks[name] = self.style(next(iter(weights)))

    def stream(self, row: dict, adapter: str, sampling: Sampling = Sampling()) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        from threading import Thread

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failures: list[BaseException] = []

        def generate_into_streamer() -> None:
            try:
                self._generate([self.prompt(row, adapter)], adapter, sampling, streamer=streamer)
            except BaseException as error:  # noqa: BLE001 - handed to the reading thread, which re-raises it
                failures.append(error)
                # transformers ends the stream only when generation succeeds: without this the reader
                # below would wait forever on a CUDA OOM or any other error in this thread.
                streamer.end()

        worker = Thread(target=generate_into_streamer, name=f"generate-{adapter}", daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if failures:
            raise generation_error(failures[0], adapter) from failures[0]

    @torch.inference_mode()
    def _generate(self, prompts: list[str], adapter: str, sampling: Sampling, streamer=None) -> list[str]:
        set_seed(sampling.seed)
        self.tokenizer.padding_side = "left"  # generation continues from the right edge
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True).to(
            self.model.device
        )
        kwargs = dict(
            **batch,
            **sampling.generate_kwargs(),
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
        )
        with self.using(adapter):
            output = self.model.generate(**kwargs)
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def generation_error(error: BaseException, adapter: str) -> QloraError:
    """One message for a generation that raised, with the fix for the common case (out of memory)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return QloraError(
            f"generation with adapter {adapter!r} ran out of memory ({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
            "lower --max-new-tokens, use fewer adapters at once, or free the GPU"
        )
    return QloraError(f"generation with adapter {adapter!r} failed: {type(error).__name__}: {error}")


def parse_mix(spec: str) -> dict[str, float]:
    """'sql=0.7,json=0.3' -> {'sql': 0.7, 'json': 0.3}."""
    weights = {}
    for part in spec.split(","):
        name, sep, weight = part.rpartition("=")  # the last '=': an adapter folder path may hold one
        try:
            weights[name.strip()] = float(weight)
        except ValueError:
            raise QloraError(f"--mix {spec!r}: expected name=weight pairs, e.g. --mix sql=0.7,json=0.3") from None
        if not sep or not name.strip():
            raise QloraError(f"--mix {spec!r}: expected name=weight pairs, e.g. --mix sql=0.7,json=0.3")
    return weights


def load_records(
    adapter_refs: list[str], *, mix: dict[str, float] | None = None, home: str | None = None
) -> dict[str, AdapterRecord]:
    """The record of every adapter named (by --adapter or in the mix), by the name or path given, in the
    order given; reads only qlora.json, no weights."""
    refs = [ref for ref in dict.fromkeys([*adapter_refs, *(mix or {})]) if ref != BASE]
    return {ref: AdapterRecord.load(adapters.find_adapter(ref, home)) for ref in refs}


def open_session(
    adapter_refs: list[str],
    *,
    mix: dict[str, float] | None = None,
    base: str | None = None,
    home: str | None = None,
    allow_base_mismatch: bool = False,
) -> Session:
    """Load the base once and every named adapter beside it (names first checked, before any weights)."""
    records = load_records(adapter_refs, mix=mix, home=home)
    refs = list(records)
    if records:
        check_one_base(list(records.values()))
        section = next(iter(records.values())).base_section(base)
    elif base:
        section = ModelSection.model_validate({"id": str(Path(base).resolve()) if Path(base).exists() else base})
    else:
        raise QloraError(
            "name at least one adapter (--adapter NAME), or the base model with --base MODEL and --adapter none"
        )
    model_dir = resolve_model_dir(section)
    fingerprint = fingerprint_weights(model_dir)
    for record in records.values():
        record.check_base(section.id, fingerprint, allow_mismatch=allow_base_mismatch)
    device = check_device(section)
    tokenizer = load_tokenizer(records[refs[0]].folder if refs else model_dir, section)
    model = load_model(section, model_dir, device=device)
    model.config.use_cache = True
    model.eval()
    for record in records.values():
        name = record.folder.name
        if isinstance(model, PeftModel):
            model.load_adapter(str(record.folder), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(record.folder), adapter_name=name)
    session = Session(
        model=model,
        tokenizer=tokenizer,
        base_id=section.id,
        templates={record.folder.name: record.template for record in records.values()},
        tasks={record.folder.name: record.task for record in records.values()},
    )
    if mix:
        session.add_mix({records[ref].folder.name: weight for ref, weight in mix.items()})
    log.info("loaded %s with adapters: %s", section.id, ", ".join(session.templates) or "none")
    return session


def open_targets(
    adapter_refs: list[str],
    *,
    mix: str | None = None,
    compare: bool = False,
    base: str | None = None,
    home: str | None = None,
    allow_base_mismatch: bool = False,
) -> tuple[Session, list[str]]:
    """The session for `qlora generate`, and what answers, in order: the mix if there is one, else each
    named adapter once; --compare puts the base first."""
    weights = parse_mix(mix) if mix else None
    session = open_session(adapter_refs, mix=weights, base=base, home=home, allow_base_mismatch=allow_base_mismatch)
    targets = [MIX] if weights else [ref if ref == BASE else Path(ref).name for ref in dict.fromkeys(adapter_refs)]
    if compare:
        targets = [BASE, *[name for name in targets if name != BASE]]
    return session, targets


def converse(
    session: Session,
    targets: list[str],
    instructions: Iterable[str],
    input_text: str,
    sampling: Sampling,
    *,
    show: Callable[[str], None],
    show_heading: Callable[[str], None],
) -> None:
    """Answer each instruction with every target, showing the text as it is generated; an empty
    instruction ends the conversation."""
    for instruction in instructions:
        if not instruction.strip():
            return
        warn_unknown_words(session.tokenizer, [{"instruction": instruction, "input": input_text}])
        for name in targets:
            if len(targets) > 1:
                show_heading(f"── {name} ──")
            for piece in session.stream({"instruction": instruction, "input": input_text}, name, sampling):
                show(piece)
            show("\n")


CHAT_HELP = "type an instruction and press Enter; an empty line, Ctrl-D or Ctrl-C leaves"


def chat_instructions(read: Callable[[str], str] = input) -> Iterator[str]:
    """Instructions typed at the 'you: ' prompt, until an empty line, end of input (Ctrl-D) or Ctrl-C."""
    while True:
        try:
            line = read("you: ")
        except (EOFError, KeyboardInterrupt):
            return
        if not line.strip():
            return
        yield line


def unknown_words(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The pieces of `text` the tokenizer can only read as its unknown token (a word-level vocabulary, like
    the tiny base's, lacks most words), once each. Byte-level and byte-fallback tokenizers have none."""
    unknown_id = tokenizer.unk_token_id
    if unknown_id is None or not text.strip():
        return []
    if getattr(tokenizer, "is_fast", False):  # offsets need a fast tokenizer
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        pieces = (
            text[start:end]
            for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"])
            if token == unknown_id
        )
    else:
        pieces = (word for word in text.split() if unknown_id in tokenizer(word, add_special_tokens=False)["input_ids"])
    return list(dict.fromkeys(pieces))


def warn_unknown_words(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> None:
    """Warn when prompts hold words the model cannot see: it reads each as one unknown token, so its
    answer cannot repeat them and is a guess about them."""
    per_row = [unknown_words(tokenizer, f"{row['instruction']}\n{row.get('input') or ''}") for row in rows]
    words = list(dict.fromkeys(word for found in per_row for word in found))
    if not words:
        return
    shown = ", ".join(repr(word) for word in words[:10]) + (f" and {len(words) - 10} more" if len(words) > 10 else "")
    where = "the prompt" if len(rows) == 1 else f"{sum(map(bool, per_row))} of {len(rows)} prompts"
    log.warning(
        "%s holds words the tokenizer cannot represent: %s; the model reads each as %s, so its answer cannot use them",
        where,
        shown,
        tokenizer.unk_token,
    )


@dataclass(frozen=True)
class BatchAnswers:
    """Batch mode: each prompt row as given, with the adapter that answered it and its answer (ANSWER_FIELD)."""

    answers: tuple[dict, ...]
    out: Path | None  # where they were written; None: they go to stdout


def run_batch(
    session: Session, rows: list[dict], targets: list[str], sampling: Sampling, out: Path | None = None
) -> BatchAnswers:
    """Every row answered by each target, or only by the one its "adapter" field names."""
    warn_unknown_words(session.tokenizer, rows)
    answers = []
    for name in targets:
        chosen = [row for row in rows if row.get("adapter", name) == name]
        for row, answer in zip(chosen, session.ask(chosen, name, sampling)):
            answers.append({**row, "adapter": name, ANSWER_FIELD: answer})
    if out is not None:
        out.write_text(_jsonl(answers))
        log.info("%d answers written to %s", len(answers), out)
    return BatchAnswers(tuple(answers), out)


def render_batch(batch: BatchAnswers) -> str:
    """The answers as JSONL for stdout; nothing when they were written to a file."""
    return "" if batch.out is not None else _jsonl(batch.answers)


def _jsonl(rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


# Batch mode adds the answer in a field of its own: every field of the input row comes back as it was
# (a row's "output", say a reference answer, stays beside the model's answer).
ANSWER_FIELD = "answer"


def read_prompts(path: Path) -> list[dict]:
    """Prompt rows for batch mode: {"instruction", "input"?, "adapter"?} per JSONL line (a bare string is an
    instruction). Checked whole before any model loads."""
    from qlora_cli.data import numbered_jsonl

    if not path.is_file():
        raise QloraError(f"--prompts {path}: no such file")
    rows = []
    for number, row in numbered_jsonl(path):
        if isinstance(row, str):
            row = {"instruction": row}
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise QloraError(f'{path}: line {number}: expected {{"instruction": ..., "input": ...}}')
        if ANSWER_FIELD in row:
            raise QloraError(
                f'{path}: line {number}: the row already has an "{ANSWER_FIELD}" field, where generate writes its '
                f"answer; rename that field (every other field is kept as it is)"
            )
        rows.append(row)
    return rows
