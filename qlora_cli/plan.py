"""Command `plan`: predict peak GPU memory and time per epoch from the model's config.json alone.

No torch, transformers or peft here: `memory` predicts the peak from the config's shapes, so `qlora plan`
answers at once and before any weights are downloaded. This module fetches the config, suggests changes
when the peak does not fit, times an epoch and renders the figures.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from qlora_cli.errors import QloraError
from qlora_cli.memory import (
    ALLOCATOR_SLACK,
    GB,
    OFFLOAD_STASH_TENSORS,
    OPTIMIZER_BYTES_PER_PARAM,
    Estimate,
    count_parameters,
    estimate,
    lora_parameters,
    model_shape,
    residual_bytes,
)
from qlora_cli.recipe import Recipe, is_local

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gpu:
    key: str  # what --gpu takes
    name: str
    memory_gb: float  # as the vendor quotes it (see memory.GB)
    peak_tflops: float  # dense bf16 tensor-core peak, no sparsity; fp16 on cards without bf16 (T4)


# Datasheet figures of the cards people rent for QLoRA.
GPUS = (
    Gpu("h200", "H200", 141, 989),
    Gpu("h100", "H100 SXM", 80, 989),
    Gpu("h100-pcie", "H100 PCIe", 80, 756),
    Gpu("a100-80gb", "A100 80GB", 80, 312),
    Gpu("a100-40gb", "A100 40GB", 40, 312),
    Gpu("l40s", "L40S", 48, 362),
    Gpu("a6000", "RTX A6000", 48, 155),
    Gpu("rtx4090", "RTX 4090", 24, 165),
    Gpu("rtx3090", "RTX 3090", 24, 71),
    Gpu("a10", "A10", 24, 125),
    Gpu("l4", "L4", 24, 121),
    Gpu("t4", "T4", 16, 65),
)
DEFAULT_GPU = GPUS[1]  # assumed when none is named or found

# A plain HF/TRL QLoRA stack reaches about 32% of the datasheet peak on 7B-and-larger models (40% of the
# 790 TFLOP/s an H100 really sustains on dense bf16 matmuls). Narrower models use the tensor cores less well:
# the share falls in proportion to the hidden size below 4096. Whatever the FLOPs, every micro-step pays
# kernel launches per layer and every optimizer step a fixed cost (optimizer, data, logging): on small models
# these dominate, which is why a 4M-parameter model trains at thousands of tokens/s, not millions.
LARGE_MODEL_SHARE = 0.32
FULL_SHARE_HIDDEN = 4096
LAYER_LAUNCH_SECONDS = 1.0e-3  # forward, recompute and backward kernels of one decoder layer, one micro-step
STEP_OVERHEAD_SECONDS = 0.03


# How nvidia-smi and people name the cards: (key, all of these, none of these), first match wins.
GPU_NAMES = (
    ("h200", ("h200",), ()),
    ("h100-pcie", ("h100", "pcie"), ()),
    ("h100", ("h100",), ()),
    ("a100-80gb", ("a100", "80g"), ()),
    ("a100-40gb", ("a100",), ()),
    ("l40s", ("l40s",), ()),
    ("a6000", ("a6000",), ()),
    ("rtx4090", ("4090",), ()),
    ("rtx3090", ("3090",), ()),
    ("a10", ("a10",), ("a100", "a10g")),  # the A10G runs slower clocks than the A10: not assumed equal
    ("l4", ("l4",), ("l40",)),
    ("t4", ("t4",), ()),
)


def find_gpu(name: str) -> Gpu | None:
    """The card of the table that `name` means: a key (h100) or what nvidia-smi prints ('NVIDIA A100-SXM4-80GB')."""
    plain = name.lower().replace(" ", "").replace("-", "").replace("_", "")
    by_key = {gpu.key: gpu for gpu in GPUS}
    for key, wanted, unwanted in GPU_NAMES:
        if all(part in plain for part in wanted) and not any(part in plain for part in unwanted):
            return by_key[key]
    return None


def detect_gpu() -> tuple[str, float] | None:
    """(name, memory in GB) of the first GPU nvidia-smi lists; None without one. No torch: plan stays instant."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = listed.stdout.strip().splitlines()[0] if listed.returncode == 0 and listed.stdout.strip() else ""
    name, _, mib = first.rpartition(",")
    try:
        return name.strip(), float(mib) * 2**20 / GB
    except ValueError:
        return None


def assumed_throughput(config: dict, recipe: Recipe, gpu: Gpu) -> float:
    """Tokens per second a QLoRA run of this recipe reaches on `gpu`, by the assumptions above."""
    share = LARGE_MODEL_SHARE * min(1.0, model_shape(config).hidden / FULL_SHARE_HIDDEN)
    train = recipe.train
    micro_batch_tokens = train.batch_size * recipe.data.max_length
    step_tokens = micro_batch_tokens * train.grad_accum
    compute = step_tokens * flops_per_token(config, recipe) / (gpu.peak_tflops * 1e12 * share)
    launches = train.grad_accum * model_shape(config).layers * LAYER_LAUNCH_SECONDS
    return step_tokens / (compute + launches + STEP_OVERHEAD_SECONDS)


def _with(recipe: Recipe, section: str, **changes) -> Recipe:
    return recipe.model_copy(update={section: getattr(recipe, section).model_copy(update=changes)})


def _re_estimate(estimate_: Estimate, recipe: Recipe) -> Estimate:
    # A stated token count scales with the batch and the row length it was stated for.
    old, new = estimate_.recipe, recipe
    tokens = (
        estimate_.tokens_per_micro_batch
        * new.train.batch_size
        * new.data.max_length
        // (old.train.batch_size * old.data.max_length)
    )
    return estimate(
        estimate_.config, recipe, tokens_per_micro_batch=max(tokens, 1), fused_lm_head=estimate_.fused_lm_head
    )


def _halvings(value: int, floor: int) -> list[int]:
    values = []
    while value // 2 >= floor:
        value //= 2
        values.append(value)
    return values


@dataclass(frozen=True)
class Suggestion:
    """A change to the recipe, as the --set flags that make it, and the peak it predicts."""

    changes: tuple[tuple[str, object], ...]  # (section.key, value)
    peak_bytes: int
    note: str = ""

    @property
    def flags(self) -> str:
        return " ".join(f"--set {key}={_yaml_value(value)}" for key, value in self.changes)

    def __str__(self) -> str:
        # The flags come last so that a line pastes into a shell; the note is a shell comment.
        return f"{self.peak_bytes / GB:5.1f} GB  {self.flags}" + (f"  # {self.note}" if self.note else "")


def _yaml_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _candidates(recipe: Recipe) -> list[tuple[str, str, dict, str]]:
    """(kind, section, changes, note) that lower the peak; within a kind, milder steps first."""
    train, lora, data = recipe.train, recipe.lora, recipe.data
    candidates: list[tuple[str, str, dict, str]] = []
    if not train.gradient_checkpointing:
        candidates.append(("checkpointing", "train", {"gradient_checkpointing": True}, "~30% slower"))
    for batch in _halvings(train.batch_size, 1):
        accum = train.grad_accum * train.batch_size // batch
        candidates.append(("batch", "train", {"batch_size": batch, "grad_accum": accum}, "same effective batch"))
    if train.optim in ("paged_adamw_32bit", "adamw_torch"):
        eight_bit = "paged_adamw_8bit" if train.optim == "paged_adamw_32bit" else "adamw_bnb_8bit"
        candidates.append(("optimizer", "train", {"optim": eight_bit}, ""))
    if not train.activation_offloading:
        candidates.append(("offloading", "train", {"activation_offloading": True}, "some speed"))
    for length in _halvings(data.max_length, 256):
        candidates.append(("length", "data", {"max_length": length}, "longer examples are truncated"))
    for rank in _halvings(lora.r, 8):
        candidates.append(("rank", "lora", {"r": rank}, ""))
    return candidates


def _flags(section: str, changes: dict) -> tuple[tuple[str, object], ...]:
    return tuple((f"{section}.{key}", value) for key, value in changes.items())


def suggest(estimate_: Estimate, budget_bytes: float, recipe: Recipe) -> list[Suggestion]:
    """Changes that bring the predicted peak under budget: every single change that fits (the mildest step of
    each kind); when none does alone, the fewest of them, taken in order, that fit together. Empty when even
    all of them do not fit."""
    candidates = _candidates(recipe)
    suggestions, fitted_kinds = [], set()
    for kind, section, changes, note in candidates:
        if kind in fitted_kinds:
            continue
        peak = _re_estimate(estimate_, _with(recipe, section, **changes)).total
        if peak <= budget_bytes:
            fitted_kinds.add(kind)
            suggestions.append(Suggestion(_flags(section, changes), peak, note))
    if suggestions:
        return suggestions

    combined, applied = recipe, {}
    for kind, section, changes, _ in candidates:
        combined = _with(combined, section, **changes)
        applied[kind] = _flags(section, changes)  # the latest step of each kind replaces the milder one
        peak = _re_estimate(estimate_, combined).total
        if peak <= budget_bytes:
            return [Suggestion(tuple(flag for flags in applied.values() for flag in flags), peak, "all together")]
    return []


def spend_headroom(estimate_: Estimate, budget_bytes: float, recipe: Recipe) -> list[Suggestion]:
    """With memory to spare, the changes that still fit and make training faster."""
    train = recipe.train
    options: list[tuple[str, dict, str]] = []
    if train.gradient_checkpointing:
        options.append(("train", {"gradient_checkpointing": False}, "no recomputation: ~30% faster"))
    if train.activation_offloading:
        options.append(("train", {"activation_offloading": False}, "no CPU round trips"))
    if train.grad_accum % 2 == 0:
        options.append(
            (
                "train",
                {"batch_size": train.batch_size * 2, "grad_accum": train.grad_accum // 2},
                "same effective batch, fuller steps",
            )
        )
    else:
        options.append(("train", {"batch_size": train.batch_size * 2}, "twice the effective batch"))
    spent = []
    for section, changes, note in options:
        peak = _re_estimate(estimate_, _with(recipe, section, **changes)).total
        if peak <= budget_bytes:
            spent.append(Suggestion(_flags(section, changes), peak, note))
    return spent


def flops_per_token(config: dict, recipe: Recipe) -> float:
    """Training FLOPs per token: forward, recompute when checkpointing, backward without base weight gradients.
    Matmuls cost 2 FLOPs per weight per token; causal attention 2 x 2 x seq/2 x width per layer (QK^T and AV);
    its backward 2.5x the forward (the fused kernel recomputes the scores); LoRA's backward computes both
    input and weight gradients. Mistral-7B at 2048: 15.1 + 14.8 + 16.2 = 46.1 GFLOP."""
    shape = model_shape(config)
    counts = count_parameters(config)
    lora = lora_parameters(config, recipe.lora.r, recipe.lora.target_modules, use_dora=recipe.lora.use_dora)
    attention = 2 * 2 * (recipe.data.max_length / 2) * shape.attention_width * shape.layers
    head = 2 * (shape.vocab * shape.hidden)
    layers_forward = 2 * counts["linear"] + attention + 2 * lora
    forward = layers_forward + head
    backward = 2 * counts["linear"] + 2.5 * attention + 4 * lora + head
    recompute = layers_forward if recipe.train.gradient_checkpointing else 0
    return forward + recompute + backward


def epoch_time(tokens: int, tokens_per_second: float) -> float:
    """Seconds to train on `tokens` tokens at a throughput in tokens per second."""
    return tokens / tokens_per_second


@dataclass(frozen=True)
class Plan:
    estimate: Estimate
    config_source: str
    budget_bytes: float | None
    suggestions: list[Suggestion]  # when it does not fit
    headroom: list[Suggestion]  # when it fits with room to spare
    gpu: str  # the card the figures are for, and how it was chosen
    tokens_per_second: float
    throughput_source: str
    dataset_tokens: int | None
    epoch_seconds: float | None

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.estimate.total <= self.budget_bytes


def load_config(recipe: Recipe) -> tuple[dict, str]:
    """The model's config.json as a dict, and where it came from: the local folder, or the hub (its cache first)."""
    model_id = recipe.model.id
    if is_local(model_id):
        path = Path(model_id) / "config.json"
        if not path.is_file():
            raise QloraError(f"model.id: {model_id} has no config.json; is it a transformers model folder?")
    else:
        from huggingface_hub import constants, hf_hub_download

        try:
            # Served from the local cache when it holds the file, so a config fetched once works offline.
            path = Path(hf_hub_download(model_id, "config.json", revision=recipe.model.revision))
        except Exception as error:  # offline, network, auth and missing-repo errors all surface here
            reason = (
                "offline mode is on (HF_HUB_OFFLINE)"
                if constants.HF_HUB_OFFLINE
                else f"{type(error).__name__}: {error}"
            )
            raise QloraError(
                f"model.id: cannot get config.json for {model_id!r} from the hub ({reason}) and it is not in the local cache; "
                f"fetch it once with `hf download {model_id} config.json`, or set model.id to a local folder that holds config.json"
            ) from None
    config = read_config(path)
    log.info("model config from %s", path)
    return config, str(path)


def cached_config_path(model_id: str, revision: str | None) -> Path | None:
    """Where the local Hugging Face cache holds the model's config.json, without a network request; None if not."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
    # None: never fetched; _CACHED_NO_EXIST: fetched, and the repo has no such file.
    return Path(cached) if isinstance(cached, str) else None


def read_config(path: Path) -> dict:
    """A model's config.json as a dict; one error naming the file when it is not one."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise QloraError(f"model.id: cannot read {path}: {error}") from None
    if not isinstance(config, dict):
        raise QloraError(f"model.id: {path} is not a JSON object")
    return config


def choose_gpu(named: str | None) -> tuple[Gpu, float | None, str]:
    """The card to plan for, its memory in GB when known, and a phrase saying how it was chosen."""
    if named:
        gpu = find_gpu(named)
        if gpu is None:
            known = ", ".join(gpu.key for gpu in GPUS)
            raise QloraError(f"--gpu {named!r}: not a card qlora knows; use one of {known}, or --tokens-per-second")
        return gpu, gpu.memory_gb, f"{gpu.name} (--gpu)"
    found = detect_gpu()
    if found is None:
        return DEFAULT_GPU, None, f"{DEFAULT_GPU.name} (assumed: no GPU found here)"
    name, memory_gb = found
    gpu = find_gpu(name)
    if gpu is None:
        return (
            DEFAULT_GPU,
            memory_gb,
            f"{name} (found; not in qlora's table, its speed assumed an {DEFAULT_GPU.name}'s)",
        )
    return gpu, memory_gb, f"{name} (found on this machine)"


def run(
    recipe: Recipe,
    *,
    gpu_memory_gb: float | None,
    tokens_per_second: float | None,
    dataset_tokens: int | None,
    gpu: str | None = None,
) -> Plan:
    """Resolve the config, estimate memory, suggest changes (to fit, or to spend the room left), and time an epoch."""
    config, source = load_config(recipe)
    card, card_memory_gb, card_source = choose_gpu(gpu)
    predicted = estimate(config, recipe)
    memory_gb = gpu_memory_gb if gpu_memory_gb is not None else card_memory_gb
    budget = None if memory_gb is None else memory_gb * GB
    fits = budget is not None and predicted.total <= budget
    suggestions = suggest(predicted, budget, recipe) if budget is not None and not fits else []
    headroom = spend_headroom(predicted, budget, recipe) if fits else []
    if tokens_per_second:
        throughput_source = "stated"
    else:
        tokens_per_second = assumed_throughput(config, recipe, card)
        throughput_source = f"assumed for {card.name}; give a measured figure with --tokens-per-second"
    return Plan(
        estimate=predicted,
        config_source=source,
        budget_bytes=budget,
        suggestions=suggestions,
        headroom=headroom,
        gpu=card_source,
        tokens_per_second=tokens_per_second,
        throughput_source=throughput_source,
        dataset_tokens=dataset_tokens,
        epoch_seconds=epoch_time(dataset_tokens, tokens_per_second) if dataset_tokens else None,
    )


def breakdown(estimate_: Estimate) -> list[tuple[str, int, str]]:
    """(component, bytes, note) in the order the table shows them."""
    shape = model_shape(estimate_.config)
    counts = count_parameters(estimate_.config)
    recipe, model = estimate_.recipe, estimate_.recipe.model
    quantized = counts["linear"]
    lora = lora_parameters(estimate_.config, recipe.lora.r, recipe.lora.target_modules, use_dora=recipe.lora.use_dora)
    tokens = f"{estimate_.tokens_per_micro_batch:,} tokens"
    residual = "fp32" if residual_bytes(model) == 4 else model.compute_dtype
    if model.load_in_4bit:
        constants = "8-bit absmax + fp32 per 256 (double quant)" if model.double_quant else "fp32 absmax per 64 weights"
        weights = [
            (
                "4-bit base weights",
                estimate_.quantized_weights,
                f"{quantized / 1e9:.2f} B params x 4 bit ({model.quant_type})",
            ),
            ("quantization constants", estimate_.quantization_constants, constants),
            (
                "embeddings, LM head, norms",
                estimate_.unquantized_weights,
                f"{(counts['total'] - quantized) / 1e9:.2f} B params in fp32 (peft upcasts them for training)",
            ),
        ]
    else:
        weights = [
            (
                "base weights",
                estimate_.unquantized_weights,
                f"{counts['total'] / 1e9:.2f} B params in {model.compute_dtype}",
            )
        ]
    offloading = recipe.train.activation_offloading
    if recipe.train.gradient_checkpointing:
        checkpoints = f"{shape.layers} layers x {shape.hidden} x {residual} x {tokens}"
        if offloading:
            checkpoints = f"offloaded to CPU but {OFFLOAD_STASH_TENSORS} layers' in flight"
        layer = f"recompute of one layer in backward, {tokens}"
    else:
        checkpoints = "none: gradient checkpointing is off"
        layer = f"all {shape.layers} layers' intermediates, {tokens}"
        if offloading:
            layer = f"one layer's intermediates (the rest offloaded to CPU), {tokens}"
    optimizer = f"{recipe.train.optim}: {OPTIMIZER_BYTES_PER_PARAM[recipe.train.optim]:.2g} B/param"
    return [
        *weights,
        (
            "LoRA weights",
            estimate_.lora_weights,
            f"{lora / 1e6:.1f} M params (r={recipe.lora.r}{', DoRA magnitudes' if recipe.lora.use_dora else ''}) in fp32",
        ),
        ("LoRA gradients", estimate_.lora_gradients, "fp32"),
        ("optimizer states", estimate_.optimizer_states, optimizer),
        ("activation checkpoints", estimate_.activation_checkpoints, checkpoints),
        ("layer activations", estimate_.layer_activations, layer),
        (
            "dequantized weight buffer",
            estimate_.dequantized_weight_buffer,
            f"largest linear in {model.compute_dtype}" if model.load_in_4bit else "none: the base is not quantized",
        ),
        *(
            [("DoRA weight norms", estimate_.dora_weights, "largest adapted linear: W, B @ A and their sum, at once")]
            if recipe.lora.use_dora
            else []
        ),
        (
            "LM head and loss",
            estimate_.lm_head_loss,
            "chunked by TRL: logits never materialized"
            if estimate_.fused_lm_head
            else f"full logits: {shape.vocab} x 10 B/token",
        ),
        ("CUDA context", estimate_.cuda_context, "not in torch.cuda.max_memory_allocated"),
        ("allocator slack", estimate_.allocator_slack, f"{ALLOCATOR_SLACK:.0%} fragmentation of the caching allocator"),
    ]


def duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours} h {rest // 60:02d} min" if hours else f"{rest // 60} min {rest % 60:02d} s"


def render(plan: Plan) -> Group:
    """The breakdown table, the fit verdict with headroom, suggestions and time per epoch, for a rich Console."""
    recipe = plan.estimate.recipe
    table = Table(
        title=f"Peak GPU memory: {Path(recipe.model.id).name if is_local(recipe.model.id) else recipe.model.id}, "
        f"batch {recipe.train.batch_size} x {recipe.data.max_length} tokens"
    )
    table.add_column("component")
    table.add_column("GB", justify="right")
    table.add_column("note", style="dim")
    for name, bytes_, note in breakdown(plan.estimate):
        table.add_row(name, f"{bytes_ / GB:.2f}", note)
    table.add_section()
    table.add_row("total", f"{plan.estimate.total / GB:.2f}", "", style="bold")

    lines: list = [table, Text(f"GPU: {plan.gpu}")]
    if plan.budget_bytes is None:
        lines.append(Text("Pass the GPU's memory (--gpu-memory GB) or its name (--gpu) to check the fit."))
    elif plan.fits:
        headroom = (plan.budget_bytes - plan.estimate.total) / GB
        lines.append(Text(f"Fits {plan.budget_bytes / GB:.1f} GB with {headroom:.1f} GB headroom.", style="green"))
        if plan.headroom:
            lines.append(Text("Room to spare; these still fit and train faster (new predicted peak, flags):"))
            lines.extend(Text(f"  {suggestion}") for suggestion in plan.headroom)
    else:
        over = (plan.estimate.total - plan.budget_bytes) / GB
        lines.append(Text(f"Does not fit {plan.budget_bytes / GB:.1f} GB: {over:.1f} GB over.", style="bold red"))
        if plan.suggestions:
            lines.append(Text("Changes that would fit (new predicted peak, flags for qlora train):"))
            lines.extend(Text(f"  {suggestion}") for suggestion in plan.suggestions)
        else:
            lines.append(
                Text("No change to batch, length, checkpointing, rank or optimizer fits: use a GPU with more memory.")
            )
    throughput = f"{plan.tokens_per_second:,.0f} tokens/s ({plan.throughput_source})"
    if plan.epoch_seconds is not None:
        lines.append(
            Text(f"Time per epoch: {duration(plan.epoch_seconds)} for {plan.dataset_tokens:,} tokens at {throughput}.")
        )
    else:
        lines.append(
            Text(f"Throughput {throughput}; pass the dataset's token count (--dataset-tokens) for the time per epoch.")
        )
    return Group(*lines)
