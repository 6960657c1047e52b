"""Command `generate`: one 4-bit base in memory, any number of named adapters on top.

Each adapter is loaded under its own name beside the others, so switching is `set_adapter`, the
base alone is the adapters disabled, and a weighted mix is one more adapter built by peft's
`add_weighted_adapter`. Prompts are rendered by the same function training used.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextIteratorStreamer, set_seed

from qlora_cli import adapters
from qlora_cli.errors import QloraError
from qlora_cli.model import check_device, fingerprint_weights, load_model, load_tokenizer, resolve_model_dir
from qlora_cli.prompts import render_example
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
        """The prompt and expected completion, rendered as the adapter was trained (the base borrows the
        first adapter's template and task, so that the two answer the same question)."""
        template = self.templates.get(adapter) or next(iter(self.templates.values()), "alpaca")
        task = self.tasks.get(adapter) or next(iter(self.tasks.values()), "forward")
        if task == "reverse" and "output" not in row:
            row = {
                "instruction": "",
                "output": row["instruction"],
            }  # generate: the text given is the response to reverse
        return render_example({"output": "", **row}, template, task)

    def prompt(self, row: dict, adapter: str) -> str:
        return self.example(row, adapter)["prompt"]

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


def open_session(
    adapter_refs: list[str],
    *,
    mix: dict[str, float] | None = None,
    base: str | None = None,
    home: str | None = None,
    allow_base_mismatch: bool = False,
) -> Session:
    """Load the base once and every named adapter beside it (names first checked, before any weights)."""
    refs = [ref for ref in dict.fromkeys([*adapter_refs, *(mix or {})]) if ref != BASE]
    found = {ref: adapters.find_adapter(ref, home) for ref in refs}
    metadata = {ref: adapters.read_metadata(path) for ref, path in found.items()}
    section = _base_section(base, found, metadata)
    model_dir = resolve_model_dir(section)
    fingerprint = fingerprint_weights(model_dir)
    for ref, meta in metadata.items():
        recorded = meta.get("base", {}).get("fingerprint")
        if recorded and recorded != fingerprint and not allow_base_mismatch:
            raise QloraError(
                f"adapter {ref!r} was trained on {meta['base'].get('id')} ({recorded}), but the base being loaded is "
                f"{section.id} ({fingerprint}); pass --allow-base-mismatch if you know they are the same model"
            )
    device = check_device(section)
    tokenizer = load_tokenizer(found[refs[0]] if refs else model_dir, section)
    model = load_model(section, model_dir, device=device)
    model.config.use_cache = True
    model.eval()
    templates, tasks = {}, {}
    for ref, path in found.items():
        name = path.name
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        templates[name] = metadata[ref].get("template", "alpaca")
        tasks[name] = metadata[ref].get("task", "forward")
    if mix:
        add_mix(model, {found[ref].name: weight for ref, weight in mix.items()}, templates, tasks=tasks)
    log.info("loaded %s with adapters: %s", section.id, ", ".join(templates) or "none")
    return Session(model=model, tokenizer=tokenizer, base_id=section.id, templates=templates, tasks=tasks)


def _base_section(base: str | None, found: dict[str, Path], metadata: dict[str, dict]) -> ModelSection:
    """The base's model section: from the first adapter's recipe, with --base overriding its id."""
    if found:
        first = next(iter(found.values()))
        recipe = yaml.safe_load((first / "recipe.yaml").read_text()) if (first / "recipe.yaml").is_file() else {}
        section_data = dict(recipe.get("model") or {})
        if not section_data:
            section_data = {"id": json.loads((first / "adapter_config.json").read_text())["base_model_name_or_path"]}
        if base:
            section_data["id"] = base
        bases = {meta.get("base", {}).get("fingerprint") for meta in metadata.values()} - {None}
        if len(bases) > 1:
            listing = ", ".join(f"{ref} ({meta['base'].get('id')})" for ref, meta in metadata.items())
            raise QloraError(f"these adapters were trained on different bases and cannot share one: {listing}")
    elif base:
        section_data = {"id": base}
    else:
        raise QloraError(
            "name at least one adapter (--adapter NAME), or the base model with --base MODEL and --adapter none"
        )
    section_data["id"] = (
        str(Path(section_data["id"]).resolve()) if Path(section_data["id"]).exists() else section_data["id"]
    )
    return ModelSection.model_validate(section_data)


def add_mix(
    model: PeftModel,
    mix: dict[str, float],
    templates: dict[str, str],
    name: str = MIX,
    tasks: dict[str, str] | None = None,
) -> None:
    unknown = [name for name in mix if name not in templates]
    if unknown:
        raise QloraError(f"--mix names {unknown}, which are not loaded adapters")
    # 'cat' stacks the adapters' low-rank factors, so the mix's update is exactly sum(w_i * B_i A_i),
    # and it works across different ranks (peft's 'linear' needs equal ranks and mixes A and B separately).
    model.add_weighted_adapter(list(mix), list(mix.values()), adapter_name=name, combination_type="cat")
    templates[name] = templates[next(iter(mix))]
    if tasks is not None:
        tasks[name] = tasks.get(next(iter(mix)), "forward")


def exact_match(
    session: Session, rows: list[dict], adapter: str, sampling: Sampling = Sampling()
) -> tuple[float, list[str]]:
    answers = session.ask(rows, adapter, sampling)
    hits = sum(answer == session.example(row, adapter)["completion"].strip() for answer, row in zip(answers, rows))
    return hits / len(rows), answers


def read_prompts(path: Path) -> list[dict]:
    """Prompt rows for batch mode: {"instruction", "input"?} per JSONL line (a bare string is an instruction)."""
    from qlora_cli.data import read_jsonl

    rows = []
    for number, row in enumerate(read_jsonl(path), start=1):
        if isinstance(row, str):
            row = {"instruction": row}
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str):
            raise QloraError(f'{path}: line {number}: expected {{"instruction": ..., "input": ...}}')
        rows.append(row)
    return rows
