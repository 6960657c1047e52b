"""Command `plan`: predict peak GPU memory and time per epoch from the model's config.json alone.

No torch, transformers or peft here: the prediction is arithmetic on the config's shapes, so `qlora plan`
answers at once and before any weights are downloaded. The model is a Llama-style decoder (Llama, Mistral,
Qwen2/3, Gemma): attention with grouped KV heads and a gated MLP, trained the way `train.run` trains it
(bitsandbytes 4-bit base, peft LoRA, TRL 1.16's SFTTrainer with its fused LM-head loss).

Every term is in bytes. What the terms assume, checked against the libraries' code:
- bitsandbytes stores 4-bit weights two per byte with one absmax per 64 weights; double quantization
  stores those absmax in 8 bits with one fp32 constant per 256 of them.
- peft's prepare_model_for_kbit_training (called by lora.attach_lora for 4-bit bases) casts every 16-bit
  parameter that is not 4-bit to fp32: embeddings, LM head, norms, biases. With the embeddings and norms
  in fp32 the residual stream is fp32 too, so checkpoints and most intermediates take 4 bytes per value.
- peft keeps adapter weights in fp32 (autocast_adapter_dtype), so their gradients are fp32 as well.
- TRL 1.16 computes the loss through add_fused_lm_head: logits exist only as one tile of
  4096 tokens x 32768 vocabulary entries at a time (trl/kernels/chunked_logprob.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from qlora_cli.errors import QloraError
from qlora_cli.recipe import Recipe, is_local

log = logging.getLogger(__name__)

GB = 1e9  # decimal gigabytes, as GPU vendors and ANCHORS quote them; a "24 GB" card holds 24 GiB, so verdicts err safe

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Keys that only Mixture-of-Experts configs carry; their expert MLPs are not the dense shapes modelled here.
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")
# Architectures with more than the two RMSNorms per layer: Gemma 2/3 add norms before and after the MLP;
# Qwen3 and Gemma 3 normalise queries and keys per head.
SANDWICH_NORM_TYPES = {"gemma2", "gemma3", "gemma3_text"}
QK_NORM_TYPES = {"qwen3", "gemma3", "gemma3_text"}

BNB_BLOCKSIZE = 64  # weights per absmax constant, bitsandbytes' 4-bit default
DOUBLE_QUANT_BLOCKSIZE = 256  # first-level absmax per fp32 second-level constant (bitsandbytes' nested quant)
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Optimizer state per trainable parameter: two fp32 moments, or two 8-bit moments plus one fp32 absmax per
# 256-value block for each (bitsandbytes' blockwise 8-bit optimizers). Paged variants are the same size:
# they move to CPU only under memory pressure.
OPTIMIZER_BYTES_PER_PARAM = {
    "paged_adamw_32bit": 8.0,
    "adamw_torch": 8.0,
    "paged_adamw_8bit": 2.0 + 2 * 4 / 256,
    "adamw_bnb_8bit": 2.0 + 2 * 4 / 256,
}
PAGED_OPTIMIZERS = {"paged_adamw_32bit", "paged_adamw_8bit"}
# TRL 1.16 fused LM head tile: TOKEN_CHUNK_SIZE x _CHUNKED_LOGPROB_CHUNK_SIZE (trl/kernels/chunked_logprob.py).
FUSED_HEAD_TOKENS = 4096
FUSED_HEAD_VOCAB = 32768
# TRL's activation offloading keeps up to max_fwd_stash_size=5 saved tensors on the GPU (trl/models/activation_offloading.py).
OFFLOAD_STASH_TENSORS = 5
# The CUDA context, cuBLAS handles and workspaces: typically 0.4-0.6 GB on Ampere/Hopper with CUDA 12's lazy
# module loading. nvidia-smi counts it; torch.cuda.max_memory_allocated does not.
CUDA_CONTEXT_BYTES = int(0.5 * GB)
# The caching allocator rounds blocks up and fragments when tensor shapes change from step to step (packing
# makes them vary): reserved memory commonly runs 5-15% above what is allocated.
ALLOCATOR_SLACK = 0.08
# Dense bf16 matmul rate of an H100 (790 TFLOP/s measured) times the share a plain HF/TRL QLoRA stack reaches
# (40-55% for a well-tuned one): the throughput assumed when none is measured or stated.
ASSUMED_GPU = "an H100 at 40% of 790 TFLOP/s"
ASSUMED_FLOPS_PER_SECOND = 0.40 * 790e12


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    model_type: str

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder layer."""
        d, a, kv, f = self.hidden, self.attention_width, self.kv_width, self.intermediate
        return {
            "q_proj": (d, a),
            "k_proj": (d, kv),
            "v_proj": (d, kv),
            "o_proj": (a, d),
            "gate_proj": (d, f),
            "up_proj": (d, f),
            "down_proj": (f, d),
        }


def model_shape(config: dict) -> ModelShape:
    """The shapes that matter, from a transformers config.json dict; QloraError for what is not modelled."""
    if isinstance(config.get("text_config"), dict):
        config = config["text_config"]  # multimodal wrappers (Gemma 3): the language model is what trains
    moe = [key for key in MOE_KEYS if config.get(key)]
    if moe:
        raise QloraError(
            f"model config has {', '.join(moe)}: Mixture-of-Experts models are not covered by qlora plan yet"
        )
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in required if not config.get(key)]
    if missing:
        raise QloraError(f"model config lacks {', '.join(missing)}: is it a decoder-only transformers config?")
    model_type = str(config.get("model_type", ""))
    heads = int(config["num_attention_heads"])
    # Configs omit tie_word_embeddings when it equals their class default: True for Gemma, False for Llama/Mistral/Qwen2.
    tied = config.get("tie_word_embeddings")
    return ModelShape(
        hidden=int(config["hidden_size"]),
        intermediate=int(config["intermediate_size"]),
        layers=int(config["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        vocab=int(config["vocab_size"]),
        tied=bool(tied) if tied is not None else model_type.startswith("gemma"),
        model_type=model_type,
    )


def count_parameters(config: dict) -> dict:
    """Parameter counts by kind: linear weights per decoder layer by module name, and model-wide totals."""
    shape = model_shape(config)
    per_layer = {name: fan_in * fan_out for name, (fan_in, fan_out) in shape.linear_shapes().items()}
    norms_per_layer = 2 * shape.hidden
    if shape.model_type in SANDWICH_NORM_TYPES:
        norms_per_layer += 2 * shape.hidden
    if shape.model_type in QK_NORM_TYPES:
        norms_per_layer += 2 * shape.head_dim
    config = config.get("text_config", config)
    # Qwen2 hard-codes biases on q/k/v; Llama-style configs switch them on with attention_bias / mlp_bias.
    biases_per_layer = 0
    if shape.model_type == "qwen2" or config.get("attention_bias"):
        biases_per_layer += shape.attention_width + 2 * shape.kv_width
    if config.get("attention_bias"):
        biases_per_layer += shape.hidden
    if config.get("mlp_bias"):
        biases_per_layer += 2 * shape.intermediate + shape.hidden
    counts = {
        "linear_per_layer": per_layer,
        "linear": shape.layers * sum(per_layer.values()),
        "biases": shape.layers * biases_per_layer,
        "embeddings": shape.vocab * shape.hidden,
        "lm_head": 0 if shape.tied else shape.vocab * shape.hidden,
        "norms": shape.layers * norms_per_layer + shape.hidden,  # + the final norm
    }
    counts["total"] = counts["linear"] + counts["biases"] + counts["embeddings"] + counts["lm_head"] + counts["norms"]
    return counts


def targeted_linears(target_modules: list[str] | str) -> list[str]:
    """Linear names LoRA adapts; 'all-linear' is every linear in the decoder layers (peft leaves out the LM head).
    peft matches a listed name against the end of each module's dotted name, so 'self_attn.q_proj' counts too."""
    if target_modules == "all-linear":
        return list(LINEAR_NAMES)
    return [
        name for name in LINEAR_NAMES if any(target == name or target.endswith("." + name) for target in target_modules)
    ]


def lora_parameters(config: dict, r: int, target_modules: list[str] | str) -> int:
    """Adapter parameters: r x (in + out) for each adapted linear (A is r x in, B is out x r)."""
    shape = model_shape(config)
    linears = shape.linear_shapes()
    return shape.layers * sum(r * sum(linears[name]) for name in targeted_linears(target_modules))


@dataclass(frozen=True)
class Estimate:
    """Predicted peak GPU memory, by component, in bytes; `total` is what nvidia-smi would show at peak."""

    quantized_weights: int
    quantization_constants: int
    unquantized_weights: int
    lora_weights: int
    lora_gradients: int
    optimizer_states: int
    activation_checkpoints: int
    layer_activations: int
    dequantized_weight_buffer: int
    lm_head_loss: int
    cuda_context: int
    allocator_slack: int
    # What the prediction was made from, so suggestions can re-estimate with one thing changed.
    config: dict = field(repr=False, compare=False)
    recipe: Recipe = field(repr=False, compare=False)
    tokens_per_micro_batch: int
    fused_lm_head: bool

    @property
    def total(self) -> int:
        return (
            self.quantized_weights
            + self.quantization_constants
            + self.unquantized_weights
            + self.lora_weights
            + self.lora_gradients
            + self.optimizer_states
            + self.activation_checkpoints
            + self.layer_activations
            + self.dequantized_weight_buffer
            + self.lm_head_loss
            + self.cuda_context
            + self.allocator_slack
        )

    def rows(self) -> list[tuple[str, int, str]]:
        """(component, bytes, note) in the order the table shows them."""
        shape = model_shape(self.config)
        counts = count_parameters(self.config)
        recipe, model = self.recipe, self.recipe.model
        quantized = counts["linear"]
        lora = lora_parameters(self.config, recipe.lora.r, recipe.lora.target_modules)
        tokens = f"{self.tokens_per_micro_batch:,} tokens"
        residual = "fp32" if residual_bytes(recipe) == 4 else model.compute_dtype
        if model.load_in_4bit:
            constants = (
                "8-bit absmax + fp32 per 256 (double quant)" if model.double_quant else "fp32 absmax per 64 weights"
            )
            weights = [
                (
                    "4-bit base weights",
                    self.quantized_weights,
                    f"{quantized / 1e9:.2f} B params x 4 bit ({model.quant_type})",
                ),
                ("quantization constants", self.quantization_constants, constants),
                (
                    "embeddings, LM head, norms",
                    self.unquantized_weights,
                    f"{(counts['total'] - quantized) / 1e9:.2f} B params in fp32 (peft upcasts them for training)",
                ),
            ]
        else:
            weights = [
                (
                    "base weights",
                    self.unquantized_weights,
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
            ("LoRA weights", self.lora_weights, f"{lora / 1e6:.1f} M params (r={recipe.lora.r}) in fp32"),
            ("LoRA gradients", self.lora_gradients, "fp32"),
            ("optimizer states", self.optimizer_states, optimizer),
            ("activation checkpoints", self.activation_checkpoints, checkpoints),
            ("layer activations", self.layer_activations, layer),
            (
                "dequantized weight buffer",
                self.dequantized_weight_buffer,
                f"largest linear in {model.compute_dtype}" if model.load_in_4bit else "none: the base is not quantized",
            ),
            (
                "LM head and loss",
                self.lm_head_loss,
                "chunked by TRL: logits never materialized"
                if self.fused_lm_head
                else f"full logits: {shape.vocab} x 10 B/token",
            ),
            ("CUDA context", self.cuda_context, "not in torch.cuda.max_memory_allocated"),
            ("allocator slack", self.allocator_slack, f"{ALLOCATOR_SLACK:.0%} fragmentation of the caching allocator"),
        ]


def residual_bytes(recipe: Recipe) -> int:
    """Bytes per value of the residual stream: fp32 once peft has upcast the embeddings and norms of a 4-bit base."""
    return 4 if recipe.model.load_in_4bit else BYTES[recipe.model.compute_dtype]


def layer_saved_bytes_per_token(shape: ModelShape, recipe: Recipe) -> int:
    """Bytes one decoder layer keeps for backward per token (no checkpointing), read off the HF Llama layer
    under bf16 autocast with peft LoRA on bitsandbytes 4-bit linears:
    - 2 RMSNorms: their input (residual dtype) and the fp32 normalised value: 2 x (R + 4) x d
    - attention: SDPA keeps q, k, v and its output in the compute dtype (GQA: k and v unrepeated) and an
      fp32 log-sum-exp per head: s x (2a + 2kv) + 4 x heads
    - gated MLP: gate output (kept by the activation), activation output and up output (kept by the
      product), in the residual dtype, since bitsandbytes returns its input's dtype: 3 x R x f
    - each adapted linear: peft casts the input to fp32 and autocast back to s for lora_A, which keeps that
      copy (s x in), dropout keeps a 1-byte mask (when dropout > 0), lora_B keeps lora_A's output (s x r).
    The 4-bit base matmuls keep no input: bitsandbytes saves only the packed weight (no weight gradient).
    """
    R, s = residual_bytes(recipe), BYTES[recipe.model.compute_dtype]
    d, a, kv, f = shape.hidden, shape.attention_width, shape.kv_width, shape.intermediate
    norms = 2 * (R + 4) * d
    attention = s * (2 * a + 2 * kv) + 4 * shape.heads
    mlp = 3 * R * f
    mask = 1 if recipe.lora.dropout > 0 else 0
    linears = shape.linear_shapes()
    lora = sum(
        (s + mask) * linears[name][0] + s * recipe.lora.r for name in targeted_linears(recipe.lora.target_modules)
    )
    return norms + attention + mlp + lora


def backward_working_bytes_per_token(shape: ModelShape, recipe: Recipe) -> int:
    """Gradients alive while one layer runs backward: incoming and outgoing residual gradients and the
    gradients of the two widest MLP intermediates (gate and up), in the residual dtype."""
    return residual_bytes(recipe) * (2 * shape.hidden + 2 * shape.intermediate)


def estimate(
    config: dict, recipe: Recipe, *, tokens_per_micro_batch: int | None = None, fused_lm_head: bool = True
) -> Estimate:
    """Predict peak training memory. Tokens per micro-batch default to batch_size x max_length: packing fills
    every row to max_length, and without packing that is the longest a batch can be.
    fused_lm_head=False models a loss over full logits (label smoothing or a custom loss in TRL)."""
    shape = model_shape(config)
    counts = count_parameters(config)
    model, train = recipe.model, recipe.train
    tokens = tokens_per_micro_batch or train.batch_size * recipe.data.max_length
    s, R = BYTES[model.compute_dtype], residual_bytes(recipe)
    lora = lora_parameters(config, recipe.lora.r, recipe.lora.target_modules)
    if lora == 0:
        raise QloraError(
            f"lora.target_modules: none of {recipe.lora.target_modules} is a linear layer of a {shape.model_type or 'Llama-style'} "
            f"decoder ({', '.join(LINEAR_NAMES)}), or use 'all-linear'"
        )

    quantized = counts["linear"]
    if model.load_in_4bit:
        quantized_weights = quantized // 2
        if model.double_quant:
            constants = quantized / BNB_BLOCKSIZE + 4 * quantized / (BNB_BLOCKSIZE * DOUBLE_QUANT_BLOCKSIZE)
        else:
            constants = 4 * quantized / BNB_BLOCKSIZE
        unquantized = 4 * (counts["total"] - quantized)
        largest_linear = max(fan_in * fan_out for fan_in, fan_out in shape.linear_shapes().values())
        dequantized_buffer = s * largest_linear  # bitsandbytes dequantizes one weight to run a large matmul
    else:
        quantized_weights = constants = dequantized_buffer = 0
        unquantized = s * counts["total"]

    per_layer = layer_saved_bytes_per_token(shape, recipe) * tokens
    working = backward_working_bytes_per_token(shape, recipe) * tokens
    checkpoint_per_layer = R * shape.hidden * tokens  # non-reentrant checkpointing keeps only each layer's input
    if train.gradient_checkpointing:
        kept = min(shape.layers, OFFLOAD_STASH_TENSORS) if train.activation_offloading else shape.layers
        checkpoints = kept * checkpoint_per_layer
        layer_activations = per_layer + working
    else:
        checkpoints = 0
        # Offloading without checkpointing brings each layer's tensors back for its backward, one layer at a time.
        layer_activations = (per_layer if train.activation_offloading else shape.layers * per_layer) + working

    # What the LM head keeps: the final norm's input and output (the head's input) in the residual dtype.
    head_inputs = 2 * R * shape.hidden * tokens
    if fused_lm_head:
        tile = s * min(tokens, FUSED_HEAD_TOKENS) * min(shape.vocab, FUSED_HEAD_VOCAB)
        # The fp32 head is cast to the compute dtype one vocabulary chunk at a time; backward accumulates the
        # hidden-state gradient in fp32.
        head_chunk = s * min(shape.vocab, FUSED_HEAD_VOCAB) * shape.hidden if model.load_in_4bit and s != 4 else 0
        lm_head_loss = head_inputs + tile + head_chunk + 4 * shape.hidden * tokens
    else:
        # compute-dtype logits, their fp32 upcast for the loss and its fp32 gradient: 10 bytes per vocab entry.
        lm_head_loss = head_inputs + 10 * shape.vocab * tokens

    allocated = (
        quantized_weights
        + constants
        + unquantized
        + 8 * lora
        + OPTIMIZER_BYTES_PER_PARAM[train.optim] * lora
        + checkpoints
        + layer_activations
        + dequantized_buffer
        + lm_head_loss
    )
    return Estimate(
        quantized_weights=int(quantized_weights),
        quantization_constants=int(constants),
        unquantized_weights=int(unquantized),
        lora_weights=4 * lora,
        lora_gradients=4 * lora,
        optimizer_states=int(OPTIMIZER_BYTES_PER_PARAM[train.optim] * lora),
        activation_checkpoints=int(checkpoints),
        layer_activations=int(layer_activations),
        dequantized_weight_buffer=int(dequantized_buffer),
        lm_head_loss=int(lm_head_loss),
        cuda_context=CUDA_CONTEXT_BYTES,
        allocator_slack=int(ALLOCATOR_SLACK * allocated),
        config=config,
        recipe=recipe,
        tokens_per_micro_batch=tokens,
        fused_lm_head=fused_lm_head,
    )


def predicted_max_allocated(estimate_: Estimate) -> int:
    """The figure a GPU run's torch.cuda.max_memory_allocated() should match: the peak without the CUDA context,
    the allocator's slack and paged optimizer state (bitsandbytes allocates it as CUDA managed memory, outside
    torch's allocator)."""
    paged = estimate_.optimizer_states if estimate_.recipe.train.optim in PAGED_OPTIMIZERS else 0
    return estimate_.total - estimate_.cuda_context - estimate_.allocator_slack - paged


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
    input and weight gradients. Mistral-7B at 2048: 15.1 + 14.8 + 16.2 = 46.1 GFLOP (ANCHORS: 46.2)."""
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
    for name, bytes_, note in plan.estimate.rows():
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
