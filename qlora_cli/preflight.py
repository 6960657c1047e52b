"""What `train` checks before it loads a single weight, without loading any: `qlora validate` runs all of it,
and `train.run` the same functions before its tokenizer and weights (dry run or not).

Light on purpose: no torch, transformers or datasets at import, so `qlora validate` answers at once. The
linear layers LoRA can target come from the model's config.json for the Llama-style decoders whose layout
is known (memory.LINEAR_NAMES); any other architecture is built empty, on the meta device.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from qlora_cli import adapters, checkpoints
from qlora_cli.chat import no_chat_template
from qlora_cli.data import CheckedSection, inspect_section, rendered_format
from qlora_cli.errors import ExitCode, QloraError
from qlora_cli.files import check_new_output
from qlora_cli.memory import LINEAR_NAMES, MOE_KEYS, text_config
from qlora_cli.plan import cached_config_path, read_config
from qlora_cli.recipe import ADAPTER_NAME, RESERVED_ADAPTER_NAMES, LoraSection, Recipe, is_local, method_problem

# Model types laid out as model.layers.N.self_attn.{q,k,v,o}_proj and model.layers.N.mlp.{gate,up,down}_proj.
LLAMA_STYLE_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"}
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ModelCheck:
    id: str
    local: bool  # a folder on this machine; else a hub id
    config_source: str | None  # where config.json was read; None: not available offline
    architecture: str | None
    linear_names: tuple[str, ...] | None  # dotted names of the layers LoRA can target; None: not known here


@dataclass(frozen=True)
class Validated:
    """Command `validate`: what was checked, for a few lines of output."""

    recipe_file: Path
    recipe: Recipe
    adapter_dir: Path
    adapter_taken: str | None  # the refusal train would give for the adapter folder, if any
    data: CheckedSection
    model: ModelCheck
    targets: tuple[str, ...] | None  # the short names LoRA attaches to; None: not checked


def run(recipe: Recipe, recipe_file: Path, *, adapters_dir: str | None = None) -> Validated:
    """Check the data, the model and the target modules; one QloraError lists every problem."""
    data, problems = inspect_section(recipe.data, read_hub=False)
    checks = [lambda: check_method(recipe, data)]
    if recipe.lora.init_from is not None:
        checks.append(lambda: check_parent(recipe.lora, adapters_dir))
    for check in checks:
        try:
            check()
        except QloraError as error:
            problems.append(str(error))
    try:
        model = check_model(recipe)
    except QloraError as error:
        problems.append(str(error))
        model = ModelCheck(recipe.model.id, is_local(recipe.model.id), None, None, None)
    if data.train is not None and model.local:
        problem = chat_template_problem(recipe, rendered_format(data.train))
        if problem:
            problems.append(problem)
    targets = None
    if model.linear_names is not None:
        try:
            targets = check_targets(recipe.lora, model.linear_names)
        except QloraError as error:
            problems.append(str(error))
    if problems:
        raise QloraError(
            f"{recipe_file}: {len(problems)} problem(s)\n" + "\n".join(_indent(problem) for problem in problems)
        )
    adapter_dir = adapters.adapter_path(recipe.lora.name, adapters_dir)
    try:
        check_adapter_free(adapter_dir, recipe, recipe_file, force=False, adapters_dir=adapters_dir)
        taken = None
    except QloraError as error:
        taken = str(error)
    return Validated(recipe_file, recipe, adapter_dir, taken, data, model, targets)


# data.train_on, in words (a text row is learned whole whatever it says)
LOSS_ON = {"assistant": "each assistant turn", "last": "the last assistant turn", "all": "every token"}


def chat_template_problem(recipe: Recipe, data_format: str) -> str | None:
    """data.template: chat on a local model whose tokenizer files hold no chat template, said without loading
    the tokenizer (the same refusal train gives, see chat.template_of)."""
    if recipe.data.template_for(data_format) != "chat":
        return None
    folder = Path(recipe.model.id)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return None
    config_file = folder / "tokenizer_config.json"
    config = read_config(config_file) if config_file.is_file() else {}
    if config.get("chat_template"):
        return None
    return no_chat_template(recipe.model.id)


def _indent(problem: str) -> str:
    return "\n".join(f"  {line}" for line in problem.splitlines())


def render(validated: Validated) -> str:
    recipe, model = validated.recipe, validated.model
    lines = [f"{validated.recipe_file}: OK"]
    for label, checked in (("data", validated.data.train), ("eval data", validated.data.eval)):
        if checked is not None:
            lines.append(f"  {label}: {checked.render()}")
    if validated.data.train is None:
        lines.append(f"  data: hub dataset {recipe.data.path}: not read (train --dry-run downloads and checks it)")
    if validated.data.train is not None:
        template = recipe.data.template_for(rendered_format(validated.data.train))
        described = {"chat": "chat (the tokenizer's own chat template)", "none": "none (rows trained as they are)"}
        shown = described.get(template, Path(template).name)
        if recipe.lora.init_from is not None:  # train renders with the continued adapter's own template
            shown = f"{recipe.lora.init_from}'s own, as it was trained"
        learned = LOSS_ON["all" if validated.data.train.format == "text" else recipe.data.train_on]
        if recipe.train.method != "sft":
            learned = f"each chosen answer over its rejected one ({recipe.train.method})"
        lines.append(f"  template: {shown}; loss on {learned}")
    if recipe.data.columns:
        mapping = ", ".join(f"{field} <- {column}" for field, column in recipe.data.columns.items())
        lines.append(f"  columns: {mapping}")
    if model.local:
        lines.append(f"  model: local folder {model.id} ({model.architecture or 'architecture not named'})")
    elif model.config_source:
        lines.append(f"  model: hub id {model.id}; config from the local cache ({model.architecture})")
    else:
        lines.append(f"  model: hub id {model.id}; not checked offline (train --dry-run fetches its config)")
    if validated.targets is not None:
        targets = validated.recipe.lora.target_modules
        names = model.linear_names or ()
        layers = len(names) if not isinstance(targets, list) else len(names) - len(unmatched_layers(targets, names))
        lines.append(f"  targets: {', '.join(validated.targets)} ({layers} linear layers match)")
    else:
        lines.append(f"  targets: {_targets(recipe.lora)}: not checked without the model's config")
    lines.append(f"  adapter: {recipe.lora.name} -> {validated.adapter_dir}; run folder {recipe.train.output_dir}")
    if validated.adapter_taken:
        lines.append(f"  note: train would refuse now: {validated.adapter_taken}")
    return "\n".join(lines)


def _targets(section: LoraSection) -> str:
    return section.target_modules if isinstance(section.target_modules, str) else ", ".join(section.target_modules)


def check_model(recipe: Recipe) -> ModelCheck:
    """The model's config, from its local folder or the hub cache (never the network), and its linear layers."""
    section = recipe.model
    local = is_local(section.id)
    if local:
        config_path: Path | None = Path(section.id) / "config.json"  # load_recipe checked it is there
    else:
        config_path = cached_config_path(section.id, section.revision)
    if config_path is None or not config_path.is_file():
        return ModelCheck(section.id, local, None, None, None)
    config = read_config(config_path)
    architecture = (config.get("architectures") or [None])[0]
    return ModelCheck(section.id, local, str(config_path), architecture, linear_names(config, recipe, config_path))


def linear_names(config: dict, recipe: Recipe, config_path: Path) -> tuple[str, ...]:
    """Dotted names of the linear layers LoRA may adapt (the LM head left out, as peft's all-linear does)."""
    text = text_config(config)
    if text is config and config.get("model_type") in LLAMA_STYLE_TYPES and not any(text.get(k) for k in MOE_KEYS):
        return tuple(
            f"model.layers.{layer}.{'self_attn' if name in ATTENTION_NAMES else 'mlp'}.{name}"
            for layer in range(int(config["num_hidden_layers"]))
            for name in LINEAR_NAMES
        )
    import torch

    from qlora_cli.model import empty_model

    try:
        skeleton = empty_model(recipe.model, config_path.parent)  # modules on the meta device: no weights
    except Exception as error:  # an architecture this transformers does not know, remote code refused, ...
        raise QloraError(
            f"model.id: transformers cannot build the model of {config_path}: {type(error).__name__}: {error}"
        ) from None
    return module_linear_names(skeleton, torch.nn.Linear)


def module_linear_names(model, linear_type) -> tuple[str, ...]:
    return tuple(
        name for name, module in model.named_modules() if isinstance(module, linear_type) and name != "lm_head"
    )


def unmatched_targets(targets: list[str], names: tuple[str, ...]) -> list[str]:
    """The listed targets that match no layer, as peft matches them: a module whose dotted name is the target
    or ends with '.' + the target."""
    return [target for target in targets if not any(n == target or n.endswith("." + target) for n in names)]


def unmatched_layers(targets: list[str], names: tuple[str, ...]) -> list[str]:
    """The layers no listed target adapts (peft's rule, as in unmatched_targets)."""
    return [n for n in names if not any(n == target or n.endswith("." + target) for target in targets)]


def check_targets(section: LoraSection, names: tuple[str, ...]) -> tuple[str, ...]:
    """Every name in lora.target_modules must match a linear layer; returns the short names adapted."""
    short = sorted({name.rsplit(".", 1)[-1] for name in names})
    if not isinstance(section.target_modules, list):
        return tuple(short)
    unmatched = unmatched_targets(section.target_modules, names)
    available = f"its linear layers are: {', '.join(short)} (or use 'all-linear')"
    if len(unmatched) == len(section.target_modules):
        raise QloraError(
            f"lora.target_modules: none of {section.target_modules} is a linear layer of this model; {available}"
        )
    if unmatched:
        verb = "matches" if len(unmatched) == 1 else "match"
        raise QloraError(
            f"lora.target_modules: {', '.join(map(repr, unmatched))} {verb} no linear layer of this model, "
            f"so the adapter would train less than listed; {available}"
        )
    return tuple(target.rsplit(".", 1)[-1] for target in section.target_modules)


def free_name(recipe: Recipe, recipe_file: Path | None, adapters_dir: str | None, runs: Path = Path("runs")) -> str:
    """A name no adapter and no run folder uses yet: the recipe file's own name first, else the current name
    with -2, -3..."""
    current = recipe.lora.name
    candidates = [recipe_file.stem] if recipe_file is not None else []
    candidates += [f"{current}-{number}" for number in range(2, 1000)]
    for name in candidates:
        if name == current or not ADAPTER_NAME.match(name) or name.lower() in RESERVED_ADAPTER_NAMES:
            continue
        if not adapters.adapter_path(name, adapters_dir).exists() and not (runs / name).exists():
            return name
    return f"{current}-new"


def owner_of(folder: Path) -> tuple[str, Path | None]:
    """Who made an existing adapter folder, in words, and the recipe file it recorded (None when unknown)."""
    try:
        record = adapters.AdapterRecord.load(folder)
    except QloraError:
        return "with an unreadable qlora.json", None
    if not (folder / "qlora.json").is_file():
        return "not made by qlora (no qlora.json)", None
    if record.recipe_file:
        return f"made by recipe {record.recipe_file}", Path(record.recipe_file)
    facts = [f"trained on {record.data.path}" if record.data.path else "trained"]
    if record.base.id:
        facts.append(f"base {record.base.id}")
    if record.created:
        facts.append(record.created[:16].replace("T", " "))
    return ", ".join(facts), None


def _same_file(a: Path | None, b: Path | None) -> bool:
    return a is not None and b is not None and a.expanduser().resolve() == b.expanduser().resolve()


def check_adapter_free(
    adapter_dir: Path, recipe: Recipe, recipe_file: Path | None, *, force: bool, adapters_dir: str | None
) -> None:
    """Refuse, before any work, an adapter name another recipe's adapter already holds: name the owner and a
    free lora.name to copy. --force (which deletes the old adapter) is offered only for this very recipe's own."""
    if not adapter_dir.exists() or force:
        check_new_output(adapter_dir, "adapter", force=force)
        return
    owner, owner_file = owner_of(adapter_dir)
    same = _same_file(owner_file, recipe_file)
    rename = f"--set lora.name={free_name(recipe, recipe_file, adapters_dir)}"
    if same:
        advice = f"train under another name: {rename}, or pass --force to delete the old adapter and train it again"
    else:
        advice = f"to keep it, give this one another name: {rename}"
    check_new_output(adapter_dir, "adapter", force=force, refusal=f" ({owner}); {advice}")


def check_outputs(
    recipe: Recipe, *, adapters_dir: str | None, force: bool, resume: bool, source: Path | None
) -> Path | None:
    """The adapter folder and train.output_dir, checked before any work: the checkpoint to resume from, or None
    for a fresh run. Light to import, so that `qlora train` refuses in a second, not after loading torch."""
    source = checkpoints.original_recipe(source)
    adapter_dir = adapters.adapter_path(recipe.lora.name, adapters_dir)
    run_dir = Path(recipe.train.output_dir)
    check_adapter_free(adapter_dir, recipe, source, force=force, adapters_dir=adapters_dir)
    if not resume and not force:
        check_run_dir_free(run_dir, recipe, source, adapters_dir)
    return check_run_dir(run_dir, recipe, force=force, resume=resume, adapters_dir=adapters_dir)


def check_run_dir(
    run_dir: Path, recipe: Recipe, *, force: bool, resume: bool, adapters_dir: str | None = None
) -> Path | None:
    """Before any work: the checkpoint to resume from, or None for a fresh run (refusing to clobber one)."""
    run = checkpoints.RunFolder.load(run_dir)
    if resume:
        return checkpoints.check_resumable(run, recipe.model_dump(mode="json"), force=force)
    if run.exists and not force:
        if run.interrupted:
            raise QloraError(
                f"train.output_dir: {run_dir} holds an interrupted run (last complete checkpoint: {run.latest.name}); "
                f"continue it with: {resume_command(run_dir, adapters_dir)}",
                exit_code=ExitCode.RUN_INTERRUPTED,
            )
        if run.marker is not None:  # finished, or stopped before its first checkpoint
            raise QloraError(
                f"train.output_dir: {run_dir} already exists; pass --force to replace it", exit_code=ExitCode.RUN_EXISTS
            )
    check_new_output(run_dir, "train.output_dir", force=force)
    return None


def resume_command(run_dir: Path, adapters_dir: str | None, processes: int = 1) -> str:
    """The exact command that continues a run: the run folder holds the recipe as resolved, --set flags included.
    A launched run resumes under the same launch: one process would change the effective batch."""
    home = f" --adapters-dir {shlex.quote(adapters_dir)}" if adapters_dir else ""
    command = f"train {shlex.quote(str(run_dir))} --resume{home}"
    if processes > 1:
        return f"accelerate launch (as before, {processes} processes) -m qlora_cli {command}"
    return f"qlora {command}"


def check_run_dir_free(run_dir: Path, recipe: Recipe, recipe_file: Path | None, adapters_dir: str | None) -> None:
    """Refuse a train.output_dir that holds a finished run of another adapter or recipe, with a free folder to
    copy (exit RUN_EXISTS); interrupted runs are check_run_dir's to answer (they resume)."""
    run = checkpoints.RunFolder.load(run_dir)
    if not run.exists or run.marker is None or run.interrupted:
        return
    adapter = adapters.adapter_path(run.marker.adapter, adapters_dir)
    owner_file = owner_of(adapter)[1] if adapter.exists() else None
    folder = run_dir.parent / free_name(recipe, recipe_file, adapters_dir, runs=run_dir.parent)
    advice = f"to keep it, write this run elsewhere: --set train.output_dir={folder}"
    if not run.finished:
        # Stopped before its first checkpoint (a crash, or Ctrl-C early): nothing to resume, and no adapter.
        held = f"a run of adapter {run.marker.adapter!r} that stopped before its first checkpoint"
        if run.marker.adapter == recipe.lora.name:
            advice += ", or pass --force to start it over (its logs are deleted)"
    else:
        held = f"a finished run of adapter {run.marker.adapter!r}"
        if _same_file(owner_file, recipe_file):
            advice += ", or pass --force to delete the old run and start again"
    raise QloraError(f"train.output_dir: {run_dir} already holds {held}; {advice}", exit_code=ExitCode.RUN_EXISTS)


def check_method(recipe: Recipe, data: CheckedSection) -> None:
    """train.method against the rows each data file holds, the evaluation file's too: DPO evaluates pairs, and
    an eval file of another kind would fail only at the first evaluation (the recipe checked data.format,
    when it is set)."""
    for checked in (data.train, data.eval):
        problem = method_problem(recipe.train.method, checked.format, checked.path) if checked else None
        if problem:
            raise QloraError(problem)


def check_parent(section: LoraSection, home: str | None):
    """The adapter lora.init_from continues, checked from its files before the base is fetched: it exists,
    is not the adapter being written, and has this rank, alpha, scaling, target modules and DoRA setting (the
    recipe describes the adapter it trains)."""
    record = adapters.AdapterRecord.load(adapters.find_adapter(section.init_from, home))
    if record.folder.name == section.name:
        raise QloraError(
            f"lora.init_from: {section.init_from} is the adapter this recipe writes (lora.name); give the new one "
            "another name, so that its parent stays as it was"
        )
    config = json.loads((record.folder / "adapter_config.json").read_text())
    targets = config.get("target_modules")
    wanted = section.target_modules
    differences = []
    if config.get("r") != section.r:
        differences.append(f"rank {config.get('r')} (lora.r is {section.r})")
    if config.get("lora_alpha") is not None and float(config["lora_alpha"]) != section.alpha:
        differences.append(f"alpha {config['lora_alpha']} (lora.alpha is {section.alpha})")
    if bool(config.get("use_rslora")) != section.use_rslora:
        differences.append(f"use_rslora {bool(config.get('use_rslora'))} (lora.use_rslora is {section.use_rslora})")
    if wanted != "all-linear" and sorted(targets or []) != sorted(wanted):
        differences.append(f"target modules {sorted(targets or [])} (lora.target_modules is {sorted(wanted)})")
    if bool(config.get("use_dora")) != section.use_dora:
        differences.append(f"use_dora {bool(config.get('use_dora'))} (lora.use_dora is {section.use_dora})")
    if differences:
        raise QloraError(
            f"lora.init_from: {section.init_from} was trained with {'; '.join(differences)}; set the recipe's lora "
            "section to match the adapter it continues"
        )
    return record


def check_parent_base(section: LoraSection, record, base_id: str, fingerprint: str) -> None:
    """The continued adapter was trained on these very weights (their fingerprint), once they are at hand."""
    recorded = record.base.fingerprint
    if recorded and recorded != fingerprint:
        raise QloraError(
            f"lora.init_from: {section.init_from} was trained on {record.base.id} ({recorded}), but model.id "
            f"{base_id} has other weights ({fingerprint}); continue it on the base it was trained on"
        )
