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
from qlora_cli.chat import ROLES, last_content
from qlora_cli.errors import QloraError
from qlora_cli.model import check_device, fingerprint_weights, load_model, load_tokenizer, resolve_model_dir
from qlora_cli.prompts import Renderer, Style, render_example
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
    styles: dict[str, Style] = field(default_factory=dict)  # how each adapter was trained to be prompted
    fingerprint: str = ""  # of the base's weights: an adapter loaded later must have been trained on them
    _renderers: dict[str, Renderer] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        return [BASE, *self.styles]

    def style(self, adapter: str) -> Style:
        return style_for(self.styles, adapter)

    def renderer(self, adapter: str) -> Renderer:
        style = self.style(adapter)
        key = adapter if adapter in self.styles else BASE
        if key not in self._renderers or self._renderers[key].style != style:
            self._renderers[key] = Renderer(style, self.tokenizer)
        return self._renderers[key]

    def ask(self, rows: list[dict], adapter: str, sampling: Sampling = Sampling(), batch_size: int = 16) -> list[str]:
        """Answers for rows (alpaca fields, a prompt, or messages ending with the user's turn) from one
        adapter, in batches."""
        answers: list[str] = []
        for start in range(0, len(rows), batch_size):
            prompts = [self.prompt_ids(row, adapter) for row in rows[start : start + batch_size]]
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

    def _asked(self, row: dict, adapter: str) -> dict:
        if self.style(adapter).task == "reverse" and "output" not in row and "instruction" in row:
            return {
                "instruction": "",
                "output": row["instruction"],
            }  # generate: the text given is the response to reverse
        return row

    def example(self, row: dict, adapter: str) -> dict[str, str]:
        """The prompt text and the expected answer, rendered as the adapter was trained."""
        row = self._asked(row, adapter)
        renderer = self.renderer(adapter)
        return {"prompt": renderer.prompt_text(row), "completion": reference_answer(row, renderer.style)}

    def prompt(self, row: dict, adapter: str) -> str:
        return self.example(row, adapter)["prompt"]

    def prompt_ids(self, row: dict, adapter: str) -> list[int]:
        return self.renderer(adapter).prompt_ids(self._asked(row, adapter))

    def stop_ids(self, adapter: str) -> list[int]:
        """Every end of turn the template uses, EOS, and the ids the model's generation_config stops at
        (Qwen2.5 lists <|endoftext|> beside <|im_end|>)."""
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        configured = [configured] if isinstance(configured, int) else list(configured or [])
        return list(dict.fromkeys([*self.renderer(adapter).stop_ids(), *configured]))

    def is_dora(self, adapter: str) -> bool:
        """A DoRA adapter: peft can neither route it per row in a mixed batch nor combine it in a mix."""
        config = getattr(self.model, "peft_config", {}).get(adapter)
        return bool(getattr(config, "use_dora", False))

    def add_mix(self, weights: dict[str, float], name: str = MIX) -> None:
        """One more adapter: the weighted combination of loaded ones, prompted as its first member."""
        unknown = [adapter for adapter in weights if adapter not in self.styles]
        if unknown:
            raise QloraError(f"--mix names {unknown}, which are not loaded adapters")
        dora = [adapter for adapter in weights if self.is_dora(adapter)]
        if dora:
            # peft would stack the factors and give the mix fresh magnitudes: silently not what was trained.
            raise QloraError(
                f"cannot mix {', '.join(dora)}: a DoRA adapter's learned magnitudes do not add up with others; "
                "mix plain LoRA adapters, or merge the DoRA one (qlora merge)"
            )
        # 'cat' stacks the adapters' low-rank factors, so the mix's update is exactly sum(w_i * B_i A_i),
        # and it works across different ranks (peft's 'linear' needs equal ranks and mixes A and B separately).
        self.model.add_weighted_adapter(
            list(weights), list(weights.values()), adapter_name=name, combination_type="cat"
        )
        self.styles[name] = self.style(next(iter(weights)))

    def stream(self, row: dict, adapter: str, sampling: Sampling = Sampling()) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        from threading import Thread

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failures: list[BaseException] = []

        def generate_into_streamer() -> None:
            try:
                self._generate([self.prompt_ids(row, adapter)], adapter, sampling, streamer=streamer)
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
    def _generate(self, prompts: list[list[int]], adapter: str, sampling: Sampling, streamer=None) -> list[str]:
        set_seed(sampling.seed)
        width = max(len(ids) for ids in prompts)
        pad = self.tokenizer.pad_token_id
        # Left padding: generation continues from the right edge of every row.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=self.model.device)
        attention = torch.tensor(
            [[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=self.model.device
        )
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention,
            **sampling.generate_kwargs(),
            eos_token_id=self.stop_ids(adapter),
            pad_token_id=pad,
            streamer=streamer,
        )
        with self.using(adapter):
            output = self.model.generate(**kwargs)
        new_tokens = output[:, width:]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def reference_answer(row: dict, style: Style) -> str:
    """The answer a row holds: the last assistant turn of a conversation, a completion, or an alpaca output
    (for a reverse-task adapter, the instruction)."""
    if "messages" in row:
        return last_content(row["messages"], "assistant")
    if "completion" in row:
        return row["completion"]
    if "output" not in row:
        return ""
    return render_example(
        {"output": "", **row}, style.template if style.template == "alpaca" else "alpaca", style.task
    )["completion"]


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


def style_for(styles: dict[str, Style], adapter: str) -> Style:
    """The Style `adapter` is prompted with: its own, as trained. The base has none of its own and borrows the
    first adapter's, so that the two answer the same question."""
    owner = adapter if adapter in styles else next(iter(styles), None)
    return styles.get(owner, Style())


def open_session(
    adapter_refs: list[str],
    *,
    mix: dict[str, float] | None = None,
    base: str | None = None,
    home: str | None = None,
    allow_base_mismatch: bool = False,
    before_weights: Callable[[PreTrainedTokenizerBase], None] | None = None,
) -> Session:
    """Load the base once and every named adapter beside it (names first checked, before any weights).
    `before_weights` gets the tokenizer first: a caller's last checks that need it, before minutes of loading."""
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
    if before_weights is not None:
        before_weights(tokenizer)
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
        styles={record.folder.name: record.style for record in records.values()},
        fingerprint=fingerprint,
    )
    if mix:
        session.add_mix({records[ref].folder.name: weight for ref, weight in mix.items()})
    log.info("loaded %s with adapters: %s", section.id, ", ".join(session.styles) or "none")
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
    system: str | None = None,
) -> dict[str, list[dict]]:
    """Answer each instruction with every target, showing the text as it is generated; an empty
    instruction ends the conversation. A target trained on a chat template keeps the conversation: each
    answer is in the history of the next question. `system` opens every conversation (chat templates only).
    Returns each chat target's conversation as it went."""
    histories: dict[str, list[dict]] = {
        name: [{"role": "system", "content": system}] if system else [] for name in targets
    }
    for instruction in instructions:
        if not instruction.strip():
            break
        warn_unknown_words(session.tokenizer, [{"instruction": instruction, "input": input_text}])
        for name in targets:
            if len(targets) > 1:
                show_heading(f"── {name} ──")
            if session.style(name).is_chat:
                content = f"{instruction}\n\n{input_text}" if input_text.strip() else instruction
                histories[name].append({"role": "user", "content": content})
                row: dict = {"messages": histories[name]}
            else:
                row = {"instruction": instruction, "input": input_text}
            answer = []
            for piece in session.stream(row, name, sampling):
                answer.append(piece)
                show(piece)
            show("\n")
            if session.style(name).is_chat:
                histories[name].append({"role": "assistant", "content": "".join(answer).strip()})
    return {name: history for name, history in histories.items() if session.style(name).is_chat}


def check_system(session_styles: dict[str, Style], system: str | None) -> None:
    """--system needs adapters trained on a chat template: alpaca prompts have no place for it."""
    if system is None:
        return
    plain = [name for name, style in session_styles.items() if not style.is_chat]
    if plain:
        raise QloraError(
            f"--system: adapter {plain[0]!r} was trained with the {session_styles[plain[0]].template} template, "
            "which has no system prompt; use --system with adapters trained on a chat template"
        )


CHAT_HELP = (
    "type a message and press Enter; adapters trained on a chat template keep the conversation; "
    "an empty line, Ctrl-D or Ctrl-C leaves"
)


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
    per_row = [unknown_words(tokenizer, "\n".join(_texts(row))) for row in rows]
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


def _texts(row: dict) -> list[str]:
    """The text a prompt row gives the model: alpaca fields, a prompt, or its messages' contents."""
    if "messages" in row:
        return [m.get("content") or "" for m in row["messages"] if isinstance(m, dict)]
    return [str(row.get(key) or "") for key in ("instruction", "input", "prompt")]


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


def prompt_row_problem(row: object) -> str | None:
    """Why a batch-mode row cannot be asked: it needs an instruction, a prompt, or messages that end with
    the user's (or a tool's) turn."""
    if not isinstance(row, dict):
        return 'expected {"instruction": ..., "input": ...} or {"messages": [...]}'
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return "messages must be a non-empty list of {role, content}"
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                return f"messages[{index}].role must be one of {', '.join(ROLES)}"
            if not isinstance(message.get("content"), str):
                return f"messages[{index}].content must be text"
        if messages[-1]["role"] not in ("user", "tool"):
            return (
                f"messages end with a {messages[-1]['role']} turn; the last must be the user's, for the model to answer"
            )
        return None
    if not isinstance(row.get("instruction", row.get("prompt")), str):
        return 'expected {"instruction": ..., "input": ...}, {"prompt": ...} or {"messages": [...]}'
    return None


def read_prompts(path: Path) -> list[dict]:
    """Prompt rows for batch mode, one per JSONL line: {"instruction", "input"?}, {"prompt"} or {"messages"},
    each with an optional "adapter" (a bare string is an instruction). Checked whole before any model loads."""
    from qlora_cli.data import numbered_jsonl

    if not path.is_file():
        raise QloraError(f"--prompts {path}: no such file")
    rows = []
    for number, row in numbered_jsonl(path):
        if isinstance(row, str):
            row = {"instruction": row}
        problem = prompt_row_problem(row)
        if problem:
            raise QloraError(f"{path}: line {number}: {problem}")
        if ANSWER_FIELD in row:
            raise QloraError(
                f'{path}: line {number}: the row already has an "{ANSWER_FIELD}" field, where generate writes its '
                f"answer; rename that field (every other field is kept as it is)"
            )
        rows.append(row)
    return rows
