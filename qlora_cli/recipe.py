"""The recipe: one closed, typed schema, and the only home of defaults.

A recipe is a YAML file with four sections — `model`, `lora`, `data`, `train` — named after the
pipeline stage (and module) that reads them. Loading it validates everything that can be checked
without touching weights, and reports every problem at once by its YAML path.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from qlora_cli.errors import QloraError

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
RESERVED_ADAPTER_NAMES = ("none", "mix")  # what generate, eval and merge read as the base and as a weighted combination
# Hugging Face user access tokens; a recipe that carries one would leak it into every adapter it makes.
HUB_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


# Names users bring from peft, bitsandbytes, TRL and other tools, mapped to ours for "did you mean".
SYNONYMS = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "model_name_or_path": "id",
    "bnb_4bit_quant_type": "quant_type",
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype",
    "bnb_4bit_quant_storage": "quant_storage",
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "scheduler",
    "max_seq_length": "max_length",
    "dataset": "path",
    "save_total_limit": "save_limit",
    "chat_template": "template",
    "system_prompt": "system",
    "assistant_only_loss": "train_on",
    "completion_only_loss": "train_on",
}
DATA_FORMATS = ("alpaca", "messages", "sharegpt", "prompt_completion", "text")
# data.template: a named way to render rows, or a Jinja file (ends in TEMPLATE_SUFFIX) beside the recipe.
TEMPLATE_NAMES = ("alpaca", "chat", "none")
TEMPLATE_SUFFIX = ".jinja"
# Columns data.columns can map: the alpaca fields and each format's own.
MAPPABLE_COLUMNS = Literal[
    "instruction",
    "input",
    "output",
    "messages",
    "conversations",
    "prompt",
    "completion",
    "text",
    "system",
    "tools",
    "chosen",
    "rejected",
]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Section):
    id: str = Field(description="Hub model id (org/name) or a local folder of safetensors weights.")
    revision: str | None = Field(None, description="Hub branch, tag or commit; pin it for reproducible runs.")
    load_in_4bit: bool = Field(
        True, description="Freeze the base in 4-bit (QLoRA); false trains LoRA on a 16-bit base."
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type; NF4 fits normally distributed weights best."
    )
    double_quant: bool = Field(
        True, description="Quantize the quantization constants too: saves ~0.37 bit/param (~0.3 GB on 7B)."
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype the 4-bit weights are dequantized to for matmuls; bf16 avoids fp16 overflow."
    )
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = Field(
        "uint8", description="Container dtype of packed 4-bit weights; FSDP needs it equal to compute_dtype."
    )
    trust_remote_code: bool = Field(False, description="Run modelling code from the hub repo; needs a pinned revision.")
    attn_implementation: Literal["auto", "sdpa", "flex_attention", "flash_attention_2", "eager"] = Field(
        "auto",
        description="Attention kernel; auto: flex attention for packed training on CUDA (no dense tokens x tokens mask), else sdpa.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="Where to train; 'cuda' refuses to start without a GPU."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelSection:
        problems = []
        if not self.load_in_4bit:
            set_quant = sorted({"quant_type", "double_quant", "quant_storage"} & self.model_fields_set)
            if set_quant:
                problems.append(
                    f"{', '.join(set_quant)} only apply with load_in_4bit: true; remove them or set load_in_4bit: true"
                )
        if self.trust_remote_code and not self.revision:
            problems.append(
                "trust_remote_code: true needs a pinned revision (a commit hash), so the code you run is the code you read"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class LoraSection(Section):
    name: str = Field(
        description="Adapter name, used to find it later (`qlora generate --adapter NAME`). Defaults to the recipe's file name."
    )
    r: int = Field(16, gt=0, description="LoRA rank: adapter capacity; trainable parameters grow linearly with it.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input, in [0, 1).")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt, or 'all-linear' (every linear layer but the LM head, as in QLoRA).",
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none",
        description="Which biases to train alongside the adapter; only 'none' can be merged or served as a plain adapter.",
    )
    use_dora: bool = Field(
        False,
        description="DoRA: also learn each output row's magnitude apart from its direction. Slower steps; vLLM and "
        "SGLang do not serve it (merge it), and in qlora serve it never shares a batch with other adapters.",
    )
    use_rslora: bool = Field(
        False, description="Rank-stabilised scaling, alpha / sqrt(r) instead of alpha / r: high ranks keep learning."
    )
    lora_plus_ratio: float | None = Field(
        None,
        gt=0,
        description="LoRA+: the B matrices learn at train.lr x this ratio (the paper suggests 16); unset: one rate.",
    )
    init_from: str | None = Field(
        None,
        description="Continue an existing adapter (its name in the adapters folder, or a path) instead of starting "
        "a new one: same base, rank and target modules. The new adapter records it as its parent.",
    )
    init: Literal["kaiming", "gaussian", "pissa", "olora", "loftq"] = Field(
        "kaiming",
        description="How A and B start. kaiming (peft's default) and gaussian: random A, zero B. pissa (16-bit base) "
        "and olora start from the base's principal directions; loftq (4-bit base) from its quantisation error. "
        "pissa and olora adapters are exported as plain LoRA deltas that load on the original base.",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not ADAPTER_NAME.match(name):
            raise ValueError(
                f"adapter name {name!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if name.lower() in RESERVED_ADAPTER_NAMES:
            raise ValueError(
                f"adapter name {name!r} is reserved ('none' is the base alone, 'mix' a weighted combination); pick another"
            )
        return name

    @field_validator("bias")
    @classmethod
    def _mergeable_bias(cls, bias: str) -> str:
        # peft then saves trained copies of the base's own biases beside the LoRA factors; `qlora merge`
        # folds only B @ A into weights, so the adapter would train fine and fail at the last step.
        if bias != "none":
            raise ValueError(
                f"{bias!r} trains the base model's biases, which qlora merge cannot fold into the base; use none"
            )
        return bias

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, modules: list[str] | str) -> list[str] | str:
        if isinstance(modules, list) and not modules:
            raise ValueError("list at least one module name, or use 'all-linear'")
        return modules


class DataSection(Section):
    path: str = Field(
        description="Hub dataset id, or a local .jsonl/.json/.csv/.parquet file (relative to the recipe)."
    )
    split: str = Field("train", description="Split to train on, for hub datasets.")
    format: Literal["alpaca", "messages", "sharegpt", "prompt_completion", "text", "preference"] | None = Field(
        None,
        description="Row format: alpaca (instruction/input/output), messages (OpenAI chat), sharegpt (conversations "
        "with from/value), prompt_completion, text (loss on every token), or preference (a prompt, or "
        "instruction/input, with a chosen and a rejected answer; train.method: dpo). Unset: detected from the rows.",
    )
    columns: dict[MAPPABLE_COLUMNS, str] = Field(
        {},
        description="Dataset columns that hold a format's fields, e.g. {instruction: question, output: answer} "
        "or {messages: dialog}.",
    )
    template: str | None = Field(
        None,
        description="How rows become text: alpaca, chat (the tokenizer's own chat_template), none (text as is), "
        "or a .jinja file beside the recipe. Unset: alpaca for alpaca rows, chat for conversations, none for "
        "prompt_completion and text. The adapter records the template text and generation reuses it.",
    )
    system: str | None = Field(
        None,
        description="System prompt given to every conversation that has none; the adapter records it and "
        "generation uses it too. Needs a chat or Jinja template.",
    )
    train_on: Literal["assistant", "last", "all"] = Field(
        "assistant",
        description="Tokens the loss learns: every assistant turn (each with its end-of-turn token), the last "
        "assistant turn only, or all tokens.",
    )
    task: Literal["forward", "reverse"] = Field(
        "forward",
        description="'reverse' learns to write the instruction that a response answers (the QLoRA tutorial's task).",
    )
    eval_path: str | None = Field(None, description="Held-out file or hub split (e.g. 'test') for evaluation loss.")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of training rows held out for evaluation when eval_path is unset."
    )
    max_length: int = Field(2048, gt=0, description="Tokens per example; longer ones are truncated from the end.")
    truncated: Literal["drop", "fail"] = Field(
        "drop",
        description="Examples whose whole response falls beyond max_length teach nothing: drop them with a warning, or fail.",
    )
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows (quick experiments).")
    invalid_rows: Literal["fail", "drop"] = Field(
        "fail",
        description="Rows with an empty or missing field: stop naming the first (fail), or skip them all and say how many (drop).",
    )

    @field_validator("template")
    @classmethod
    def _known_template(cls, template: str | None) -> str | None:
        if template is None or template in TEMPLATE_NAMES or template.endswith(TEMPLATE_SUFFIX):
            return template
        close = difflib.get_close_matches(template, TEMPLATE_NAMES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"{template!r} is not a template: {hint}use one of {', '.join(TEMPLATE_NAMES)}, or a {TEMPLATE_SUFFIX} file"
        )

    @model_validator(mode="after")
    def _system_needs_chat(self) -> DataSection:
        if self.system is not None and self.template in ("alpaca", "none"):
            raise ValueError(
                f"system needs a chat template; template {self.template!r} has no place for a system prompt "
                "(set data.template: chat, or a .jinja file)"
            )
        if (
            self.template in ("chat", "alpaca")
            and self.format == "text"
            or (self.template is not None and self.template.endswith(TEMPLATE_SUFFIX) and self.format == "text")
        ):
            raise ValueError(
                f"format: text is trained as it is; template {self.template!r} has nothing to render (remove it)"
            )
        return self

    def template_for(self, data_format: str) -> str:
        """The template rows of `data_format` are rendered with: data.template, else the format's own."""
        if self.template is not None:
            return self.template
        return {"alpaca": "alpaca", "messages": "chat", "sharegpt": "chat"}.get(data_format, "none")


class TrainSection(Section):
    output_dir: str = Field(description="Run folder: checkpoints, logs and report. Defaults to runs/<lora.name>.")
    method: Literal["sft", "dpo", "orpo"] = Field(
        "sft",
        description="sft: learn the responses. dpo: learn to prefer each chosen answer over its rejected one "
        "(preference data), against the adapter as it started (or the base), with no second model in memory. "
        "orpo: the chosen answer's own loss plus an odds-ratio term, with no reference at all.",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="dpo: how strongly the adapter is held to its reference (lower lets it move further); "
        "orpo: the weight of the odds-ratio term.",
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the data; ignored when max_steps is set.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; overrides epochs.")
    batch_size: int = Field(4, gt=0, description="Examples per device per micro-step.")
    grad_accum: int = Field(
        4, gt=0, description="Micro-steps per optimizer step; effective batch = batch_size x grad_accum x GPUs."
    )
    lr: float = Field(2.0e-4, gt=0, description="Peak learning rate (QLoRA used 2e-4 for 7B-13B models).")
    scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming the learning rate up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on adapter weights.")
    max_grad_norm: float = Field(
        0.3, gt=0, description="Gradient clipping norm (QLoRA's 0.3 keeps 4-bit training stable)."
    )
    optim: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_bnb_8bit"] = Field(
        "paged_adamw_32bit",
        description="Optimizer; paged variants spill optimizer state to CPU on memory spikes instead of OOM.",
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in backward: ~30% slower, far less memory."
    )
    packing: bool = Field(
        True,
        description="Pack examples into rows of max_length tokens, each attending only to itself: no compute spent on padding.",
    )
    liger_kernel: bool = Field(
        True, description="Fused RMSNorm/RoPE/SwiGLU kernels from liger-kernel, on CUDA when it is installed."
    )
    activation_offloading: bool = Field(
        False, description="Keep checkpointed activations in CPU memory: less GPU memory, some speed."
    )
    seed: int = Field(42, description="Seed for data order, dropout and adapter initialisation.")
    logging_steps: int = Field(10, gt=0, description="Log loss every N optimizer steps (and always the last).")
    eval_steps: int | None = Field(
        None,
        gt=0,
        description="Eval loss on the held-out data every N optimizer steps; unset: at the end only. Needs data.eval_path or data.eval_fraction.",
    )
    save_steps: int = Field(100, gt=0, description="Write a checkpoint every N optimizer steps.")
    save_limit: int = Field(
        2, gt=0, description="Complete checkpoints to keep; older ones go only after a newer one is complete."
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        ["tensorboard"], description="Experiment trackers to log to (each used only if installed); [] for none."
    )


def method_problem(method: str, data_format: str | None, holder: str) -> str | None:
    """Why train.method cannot learn from rows of `data_format`, which `holder` (a file, or data.format) holds;
    None when it can, or when the format is not known yet. The recipe asks with data.format, train with the
    format it detected in the file."""
    if method in ("dpo", "orpo") and data_format not in (None, "preference"):
        return (
            f"train.method: {method} learns from preference rows (prompt or instruction, chosen, rejected); "
            f"{holder} holds {data_format} rows"
        )
    if method == "sft" and data_format == "preference":
        return f"{holder} holds preference rows (chosen, rejected): train them with --set train.method=dpo (or orpo)"
    return None


class Recipe(Section):
    model: ModelSection
    lora: LoraSection
    data: DataSection
    train: TrainSection

    @model_validator(mode="before")
    @classmethod
    def _named_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        """Fill the two defaults that come from the recipe's own name: lora.name and train.output_dir."""
        stem = (info.context or {}).get("stem")
        if not isinstance(data, dict) or stem is None:
            return data
        data = dict(data)
        lora = data.get("lora") if isinstance(data.get("lora"), dict) else {} if data.get("lora") is None else None
        if lora is not None:
            lora = {"name": stem, **lora}
            data["lora"] = lora
        train = data.get("train") if isinstance(data.get("train"), dict) else {} if data.get("train") is None else None
        if train is not None and lora is not None and isinstance(lora.get("name"), str):
            data["train"] = {"output_dir": f"runs/{lora['name']}", **train}
        return data

    @model_validator(mode="after")
    def _variant_fits_the_model(self) -> Recipe:
        lora, model = self.lora, self.model
        if lora.init == "pissa" and model.load_in_4bit:
            raise ValueError(
                "lora.init: pissa takes the base's principal directions out of its 16-bit weights, which a 4-bit base "
                "no longer has; set model.load_in_4bit: false, or use lora.init: olora or loftq"
            )
        if lora.init == "loftq" and not model.load_in_4bit:
            raise ValueError(
                "lora.init: loftq starts the adapter from the 4-bit quantisation error; it needs model.load_in_4bit: true"
            )
        if lora.init_from is not None and lora.init != "kaiming":
            raise ValueError(
                f"lora.init: {lora.init} with lora.init_from: the adapter starts from {lora.init_from}'s weights; "
                "remove one of the two"
            )
        problem = method_problem(self.train.method, self.data.format, "data.format says the data")
        if problem:
            raise ValueError(problem)
        if lora.use_dora and lora.init == "loftq":
            raise ValueError(
                "lora.use_dora with lora.init: loftq: DoRA's magnitudes are taken from the 4-bit weights before "
                "LoftQ refits A and B, so the adapter would not start as the 16-bit model; choose one of the two"
            )
        if lora.use_dora and lora.init in ("pissa", "olora"):
            raise ValueError(
                f"lora.use_dora with lora.init: {lora.init}: the export turns {lora.init} into plain LoRA deltas, which "
                "cannot carry DoRA's magnitudes; choose one of the two"
            )
        return self

    @model_validator(mode="after")
    def _evaluable(self) -> Recipe:
        if self.train.eval_steps and self.data.eval_path is None and self.data.eval_fraction == 0:
            raise ValueError(
                "train.eval_steps needs held-out data: set data.eval_path, or data.eval_fraction (e.g. 0.05)"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, validate and resolve a recipe (a file, or the name of a shipped one); raise one
    QloraError listing every problem."""
    path = find_recipe(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise QloraError(f"{path}: malformed YAML at {where}: {error.problem}") from None
    except UnicodeDecodeError as error:
        raise QloraError(f"{path}: not UTF-8 text (byte offset {error.start})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise QloraError(
            f"{path}: a recipe must be a mapping of sections (model, lora, data, train), not {type(data).__name__}"
        )
    for override in overrides:
        _apply_override(data, override)
    _refuse_tokens(data)
    problems = _resolve_paths(data, path.parent)
    try:
        recipe = Recipe.model_validate(data, context={"stem": path.stem})
    except ValidationError as error:
        problems += [_describe(e) for e in error.errors()]
    if problems:
        raise QloraError(f"{path}: {len(problems)} problem(s)\n" + "\n".join(f"  {p}" for p in problems))
    return recipe


def _apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or "." not in key:
        raise QloraError(f"--set {override!r}: expected section.key=value, e.g. --set lora.r=16")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise QloraError(f"--set {override!r}: {part} is not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        raise QloraError(f"--set {override!r}: value is not valid YAML") from None


def _refuse_tokens(node: Any, where: str = "") -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _refuse_tokens(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _refuse_tokens(value, f"{where}[{index}]")
    elif isinstance(node, str) and HUB_TOKEN.search(node):
        raise QloraError(f"{where}: looks like an access token; tokens never go in a recipe — export HF_TOKEN instead")


def _describe(error: dict) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "recipe"
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown key{_suggestion(error['loc'])}"
    if error["type"] == "missing":
        return f"{location}: required"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{location}: {message}{shown}"


def _suggestion(loc: tuple) -> str:
    *parents, unknown = loc
    schema: type[BaseModel] = Recipe
    for part in parents:
        annotation = schema.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        schema = annotation
    close = [SYNONYMS[str(unknown)]] if SYNONYMS.get(str(unknown)) in schema.model_fields else []
    close = close or difflib.get_close_matches(str(unknown), list(schema.model_fields), n=1, cutoff=0.5)
    known = ", ".join(schema.model_fields)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {known}"


def _resolve_paths(data: dict, base: Path) -> list[str]:
    """Make local paths absolute (relative to the recipe file, in place) and report the missing ones, a data
    file of a type qlora cannot read, and a model folder that is not a transformers model."""
    problems = []
    for section, key, always in (("model", "id", True), ("data", "path", True), ("data", "eval_path", False)):
        node = data.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or not (always or _looks_like_file(value)):
            continue
        resolved = local_or_hub(value, base)
        if resolved is None:
            problems.append(f"{section}.{key}: {'folder' if section == 'model' else 'file'} not found: {value}")
            continue
        node[key] = resolved
        if not is_local(resolved):
            continue
        if section == "model" and not (Path(resolved) / "config.json").is_file():
            problems.append(f"model.id: {resolved} has no config.json; is it a transformers model folder?")
        elif section == "data" and (problem := data_file_problem(resolved, f"{section}.{key}")):
            problems.append(problem)
    node = data.get("data")
    template = node.get("template") if isinstance(node, dict) else None
    if isinstance(template, str) and template.endswith(TEMPLATE_SUFFIX):
        found = next((c for c in (base / template, Path(template).expanduser()) if c.is_file()), None)
        if found is None:
            problems.append(f"data.template: file not found: {template}")
        else:
            node["template"] = str(found.resolve())
    return problems


def data_file_problem(path: str, key: str) -> str | None:
    """Why the local data file at `path` (named by recipe key `key`) cannot be read; None when it can."""
    file = Path(path)
    if file.is_dir():
        return f"{key}: {path} is a folder; name a {', '.join(DATA_SUFFIXES)} file in it"
    if file.suffix.lower() not in DATA_SUFFIXES:
        return f"{key}: {path}: unsupported file type {file.suffix.lower()!r}; use .jsonl, .json, .csv or .parquet"
    if not file.is_file():
        return f"{key}: file not found: {path}"
    return None


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # what data.read_rows reads
# Other file types people point data.path at: such a name is a (misplaced or unsupported) file, never a hub id.
OTHER_FILE_SUFFIXES = (".txt", ".tsv", ".xlsx", ".xls", ".gz", ".zip", ".arrow", ".yaml", ".yml", ".xml", ".md")


def _looks_like_file(value: str) -> bool:
    return Path(value).suffix.lower() in DATA_SUFFIXES + OTHER_FILE_SUFFIXES


def local_or_hub(value: str, base: Path) -> str | None:
    """An existing path (relative to the recipe first) is local; './x', '/x' or 'x.jsonl' must exist; else a hub id."""
    for candidate in (base / value, Path(value).expanduser()):
        if candidate.exists():
            return str(candidate.resolve())
    if value.startswith((".", "/", "~")) or _looks_like_file(value):
        return None
    return value


def is_local(value: str) -> bool:
    return Path(value).is_absolute()


def _shipped_recipes() -> Path:
    # An installed wheel carries recipes/ as the package data `qlora_cli.recipes`; a source checkout (an
    # editable install) keeps them in the top-level recipes/, where people look for them.
    package = Path(__file__).resolve().parent
    installed = package / "recipes"
    return installed if installed.is_dir() else package.parent / "recipes"


SHIPPED_RECIPES = _shipped_recipes()
TINY_BASE = SHIPPED_RECIPES / "tiny" / "base"  # the built-in 4M-parameter base the tiny recipes fine-tune


def shipped_recipe(name: str) -> Path:
    path = SHIPPED_RECIPES / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        raise QloraError(f"no shipped recipe {name!r}; shipped: {_shipped_names()}")
    return path


def _shipped_names() -> str:
    return ", ".join(p.stem for p in sorted(SHIPPED_RECIPES.glob("*.yaml")))


def find_recipe(path: str | Path) -> Path:
    """The recipe file at `path`; a run folder's recorded recipe (`qlora train runs/sql --resume`); else, for a
    bare name such as `tiny-sql`, the shipped recipe of that name, so that `qlora train tiny-sql` works from
    any folder after a plain `pip install`."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    if (candidate / "recipe.yaml").is_file() and (candidate / "qlora.json").is_file():
        return candidate / "recipe.yaml"  # a run folder: the recipe it was started with, --set flags included
    if len(candidate.parts) == 1 and (SHIPPED_RECIPES / f"{candidate.name.removesuffix('.yaml')}.yaml").is_file():
        return shipped_recipe(candidate.name)
    raise QloraError(
        f"recipe not found: {candidate}; give a recipe file, or a shipped recipe's name: {_shipped_names()}"
    )


PURPOSE_PREFIX = "# purpose:"  # the header line `recipes list` shows, written for it


@dataclass(frozen=True)
class ShippedRecipe:
    """One row of `qlora recipes list`: the name users type next, the model, the data and the purpose."""

    name: str
    model: str
    data: str
    purpose: str  # the recipe's `# purpose:` header line

    @classmethod
    def read(cls, path: Path) -> ShippedRecipe:
        text = path.read_text()
        data = yaml.safe_load(text) or {}
        purposes = [
            line.removeprefix(PURPOSE_PREFIX).strip() for line in text.splitlines() if line.startswith(PURPOSE_PREFIX)
        ]
        return cls(
            name=path.stem,
            model=str((data.get("model") or {}).get("id", "?")),
            data=str((data.get("data") or {}).get("path", "?")),
            purpose=purposes[0] if purposes else "",
        )


def list_recipes() -> list[ShippedRecipe]:
    """Command `recipes list`."""
    return [ShippedRecipe.read(path) for path in sorted(SHIPPED_RECIPES.glob("*.yaml"))]


def render_recipes(recipes: list[ShippedRecipe]):
    """Each recipe's name with its model underneath, and its purpose beside them: names and model ids stay
    whole (people copy them), the purpose wraps between words."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title="shipped recipes",
        caption="see one: qlora recipes show NAME; start yours: qlora recipes copy NAME my.yaml",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        leading=1,  # a blank line between recipes: each is two lines tall
    )
    table.add_column(Text.assemble("name ", ("/ model", "dim")), no_wrap=True)
    table.add_column("purpose", ratio=1)
    for recipe in recipes:
        table.add_row(Text.assemble(recipe.name, "\n", (recipe.model, "dim")), Text(recipe.purpose))
    return table


@dataclass(frozen=True)
class RecipeKey:
    """One row of `qlora recipes keys`: a key as a recipe (or --set) writes it, its default and what it does."""

    key: str  # section.name, as --set takes it
    default: str  # "required", or the default in YAML form
    description: str


def recipe_keys(section: str | None = None) -> list[RecipeKey]:
    """Every recipe key with its default and description, read from the schema itself (never a second copy)."""
    sections = {name: field.annotation for name, field in Recipe.model_fields.items()}
    if section is not None and section not in sections:
        raise QloraError(f"no recipe section {section!r}; sections: {', '.join(sections)}")
    keys = []
    for name, model in sections.items():
        if section not in (None, name):
            continue
        for key, field in model.model_fields.items():
            keys.append(RecipeKey(f"{name}.{key}", _default_text(name, key, field), field.description or ""))
    return keys


def _default_text(section: str, key: str, field) -> str:
    named = {("lora", "name"): "<file name>", ("train", "output_dir"): "runs/<lora.name>"}
    if (section, key) in named:  # filled from the recipe's own name by Recipe._named_defaults
        return named[section, key]
    if field.is_required():
        return "required"
    return (
        yaml.safe_dump(field.get_default(call_default_factory=True), default_flow_style=True)
        .strip()
        .removesuffix("\n...")
    )


def render_recipe_keys(keys: list[RecipeKey]):
    """Key and default stay whole; the description wraps between words beside them."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(
        title="recipe keys (set in YAML, or --set section.key=value)",
        box=box.SIMPLE_HEAD,
        show_edge=False,
    )
    table.add_column("key", no_wrap=True)
    table.add_column("default", no_wrap=True)
    table.add_column("description", ratio=1)
    for key in keys:  # Text, not markup: a default such as [tensorboard] is not a style tag
        table.add_row(Text(key.key), Text(key.default), Text(key.description))
    return table


def copy_recipe(name: str, dest: Path, *, force: bool = False) -> Path:
    """Copy a shipped recipe to start a new one; local paths are made absolute so they still resolve.

    The copy takes its names from its own file: lora.name and train.output_dir are left out, so they default
    to the new file's name. Kept, they would send the copy's adapter onto the shipped recipe's own."""
    source = shipped_recipe(name)
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and not force:
        raise QloraError(f"{dest} already exists; pass --force to replace it")
    if not ADAPTER_NAME.match(dest.stem) or dest.stem.lower() in RESERVED_ADAPTER_NAMES:
        raise QloraError(
            f"{dest}: the recipe's file name names its adapter, and {dest.stem!r} cannot "
            "(use letters, digits, '.', '_' or '-', not 'none' or 'mix'); pick another file name"
        )
    text = source.read_text()
    data = yaml.safe_load(text)
    for section, key in (("model", "id"), ("data", "path"), ("data", "eval_path"), ("data", "template")):
        value = (data.get(section) or {}).get(key)
        if isinstance(value, str) and (SHIPPED_RECIPES / value).exists():
            text = text.replace(f"{key}: {value}", f"{key}: {(SHIPPED_RECIPES / value).resolve()}", 1)
    shipped_name = (data.get("lora") or {}).get("name")
    text = _drop_keys(text, {"lora": "name", "train": "output_dir"})
    if shipped_name:
        text = text.replace(f"--adapter {shipped_name}`", f"--adapter {dest.stem}`")
    # The purpose line is written for `recipes list`, which lists shipped recipes only.
    lines = [line for line in text.splitlines(keepends=True) if not line.startswith(PURPOSE_PREFIX)]
    note = (
        f"# Copied from the shipped recipe {source.stem}. Its adapter is named after this file ({dest.stem}):\n"
        f"# set lora.name and train.output_dir to choose others.\n"
    )
    if lines and lines[0].startswith("# qlora train "):
        lines = [f"# qlora train {dest}\n", note, *lines[1:]]
    else:
        lines = [f"# qlora train {dest}\n", note, *lines]
    dest.write_text("".join(lines))
    return dest


def _drop_keys(text: str, keys: dict[str, str]) -> str:
    """The recipe text without `section: {key: ...}` lines (a top-level section and an indented key, as
    shipped recipes are written); a section left empty goes too, comments stay."""
    kept: list[str] = []
    section = None
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if line[:1] not in (" ", "\t", "#", "\n", "") and stripped.endswith(":"):
            section = stripped[:-1]
        elif section in keys and line.startswith(" ") and stripped.split(":", 1)[0] == keys[section]:
            continue
        kept.append(line)
    result: list[str] = []
    for index, line in enumerate(kept):  # a section header whose every key went
        following = next((later for later in kept[index + 1 :] if later.strip()), "")
        is_header = line[:1] not in (" ", "\t", "#", "\n") and line.strip().endswith(":")
        if is_header and line.strip()[:-1] in keys and not following.startswith((" ", "\t")):
            continue
        result.append(line)
    return "".join(result)
