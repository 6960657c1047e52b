"""Command `plan`: predict peak GPU memory and time per epoch from the model's config.json alone.

No torch, transformers or peft here: `memory` predicts the peak from the config's shapes, so `qlora plan`
answers at once and before any weights are downloaded. This module fetches the config, suggests changes
when the peak does not fit, times an epoch and renders the figures.
"""

from __future__ import annotations

import json
import logging
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

# Dense bf16 matmul rate of an H100 (790 TFLOP/s measured) times the share a plain HF/TRL QLoRA stack reaches
# (40-55% for a well-tuned one): the throughput assumed when none is measured or stated.
ASSUMED_GPU = "an H100 at 40% of 790 TFLOP/s"
ASSUMED_FLOPS_PER_SECOND = 0.40 * 790e12


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


def suggest(estimate_: Estimate, budget_bytes: float, recipe: Recipe) -> list[str]:
    """Changes that bring the predicted peak under budget, each with its new peak: every single change that
    fits (the mildest step of each kind); when none does alone, the fewest of them, taken in the order below,
    that fit together. Empty when even all of them do not fit."""
    train, lora, data = recipe.train, recipe.lora, recipe.data
    # (kind, description, section, changes); within a kind, milder steps first.
    candidates: list[tuple[str, str, str, dict]] = []
    if not train.gradient_checkpointing:
        candidates.append(
            (
                "checkpointing",
                "train.gradient_checkpointing false -> true (~30% slower)",
                "train",
                {"gradient_checkpointing": True},
            )
        )
    for batch in _halvings(train.batch_size, 1):
        accum = train.grad_accum * train.batch_size // batch
        candidates.append(
            (
                "batch",
                f"train.batch_size {train.batch_size} -> {batch}, train.grad_accum {train.grad_accum} -> {accum} "
                "(same effective batch)",
                "train",
                {"batch_size": batch, "grad_accum": accum},
            )
        )
    if train.optim in ("paged_adamw_32bit", "adamw_torch"):
        eight_bit = "paged_adamw_8bit" if train.optim == "paged_adamw_32bit" else "adamw_bnb_8bit"
        candidates.append(("optimizer", f"train.optim {train.optim} -> {eight_bit}", "train", {"optim": eight_bit}))
    if not train.activation_offloading:
        candidates.append(
            (
                "offloading",
                "train.activation_offloading false -> true (some speed)",
                "train",
                {"activation_offloading": True},
            )
        )
    for length in _halvings(data.max_length, 256):
        change = f"data.max_length {data.max_length} -> {length} (longer examples are truncated)"
        candidates.append(("length", change, "data", {"max_length": length}))
    for rank in _halvings(lora.r, 8):
        candidates.append(("rank", f"lora.r {lora.r} -> {rank}", "lora", {"r": rank}))

    suggestions, fitted_kinds = [], set()
    for kind, change, section, changes in candidates:
        if kind in fitted_kinds:
            continue
        peak = _re_estimate(estimate_, _with(recipe, section, **changes)).total
        if peak <= budget_bytes:
            fitted_kinds.add(kind)
            suggestions.append(f"{change}: {peak / GB:.1f} GB")
    if suggestions:
        return suggestions

    combined, applied = recipe, {}
    for kind, change, section, changes in candidates:
        combined = _with(combined, section, **changes)
        applied[kind] = change.split(" (", 1)[0]  # the latest step of each kind replaces the milder one
        peak = _re_estimate(estimate_, combined).total
        if peak <= budget_bytes:
            return [f"all of: {'; '.join(applied.values())}: {peak / GB:.1f} GB"]
    return []


def flops_per_token(config: dict, recipe: Recipe) -> float:
    """Training FLOPs per token: forward, recompute when checkpointing, backward without base weight gradients.
    Matmuls cost 2 FLOPs per weight per token; causal attention 2 x 2 x seq/2 x width per layer (QK^T and AV);
    its backward 2.5x the forward (the fused kernel recomputes the scores); LoRA's backward computes both
    input and weight gradients. Mistral-7B at 2048: 15.1 + 14.8 + 16.2 = 46.1 GFLOP."""
    shape = model_shape(config)
    counts = count_parameters(config)
    lora = lora_parameters(config, recipe.lora.r, recipe.lora.target_modules)
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
    suggestions: list[str]
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
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise QloraError(f"model.id: cannot read {path}: {error}") from None
    if not isinstance(config, dict):
        raise QloraError(f"model.id: {path} is not a JSON object")
    log.info("model config from %s", path)
    return config, str(path)


def run(
    recipe: Recipe, *, gpu_memory_gb: float | None, tokens_per_second: float | None, dataset_tokens: int | None
) -> Plan:
    """Resolve the config, estimate memory, suggest changes when it does not fit, and time an epoch."""
    config, source = load_config(recipe)
    predicted = estimate(config, recipe)
    budget = None if gpu_memory_gb is None else gpu_memory_gb * GB
    suggestions = suggest(predicted, budget, recipe) if budget is not None and predicted.total > budget else []
    if tokens_per_second:
        throughput_source = "stated"
    else:
        tokens_per_second = ASSUMED_FLOPS_PER_SECOND / flops_per_token(config, recipe)
        throughput_source = f"assumed: {ASSUMED_GPU}; state a measured figure with --tokens-per-second"
    return Plan(
        estimate=predicted,
        config_source=source,
        budget_bytes=budget,
        suggestions=suggestions,
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
    lora = lora_parameters(estimate_.config, recipe.lora.r, recipe.lora.target_modules)
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
        ("LoRA weights", estimate_.lora_weights, f"{lora / 1e6:.1f} M params (r={recipe.lora.r}) in fp32"),
        ("LoRA gradients", estimate_.lora_gradients, "fp32"),
        ("optimizer states", estimate_.optimizer_states, optimizer),
        ("activation checkpoints", estimate_.activation_checkpoints, checkpoints),
        ("layer activations", estimate_.layer_activations, layer),
        (
            "dequantized weight buffer",
            estimate_.dequantized_weight_buffer,
            f"largest linear in {model.compute_dtype}" if model.load_in_4bit else "none: the base is not quantized",
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


def _duration(seconds: float) -> str:
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

    lines: list = [table]
    if plan.budget_bytes is None:
        lines.append(Text("Pass the GPU's memory (--gpu-memory GB) to check the fit."))
    elif plan.fits:
        headroom = (plan.budget_bytes - plan.estimate.total) / GB
        lines.append(Text(f"Fits {plan.budget_bytes / GB:.1f} GB with {headroom:.1f} GB headroom.", style="green"))
    else:
        over = (plan.estimate.total - plan.budget_bytes) / GB
        lines.append(Text(f"Does not fit {plan.budget_bytes / GB:.1f} GB: {over:.1f} GB over.", style="bold red"))
        if plan.suggestions:
            lines.append(Text("Changes that would fit (new predicted peak):"))
            lines.extend(Text(f"  {suggestion}") for suggestion in plan.suggestions)
        else:
            lines.append(
                Text("No change to batch, length, checkpointing, rank or optimizer fits: use a GPU with more memory.")
            )
    throughput = f"{plan.tokens_per_second:,.0f} tokens/s ({plan.throughput_source})"
    if plan.epoch_seconds is not None:
        lines.append(
            Text(f"Time per epoch: {_duration(plan.epoch_seconds)} for {plan.dataset_tokens:,} tokens at {throughput}.")
        )
    else:
        lines.append(
            Text(f"Throughput {throughput}; pass the dataset's token count (--dataset-tokens) for the time per epoch.")
        )
    return Group(*lines)
