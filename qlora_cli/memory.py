"""Peak GPU memory of a training run, predicted from the model's config.json: arithmetic only.

No I/O, no torch, transformers or peft, and no presentation: `plan` fetches the config, suggests changes and
renders the figures. The model is a Llama-style decoder (Llama, Mistral, Qwen2/3, Gemma): attention with
grouped KV heads and a gated MLP, trained the way `train.run` trains it (bitsandbytes 4-bit base, peft LoRA,
TRL 1.16's SFTTrainer with its fused LM-head loss).

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

from dataclasses import dataclass, field

from qlora_cli.errors import QloraError
from qlora_cli.recipe import LoraSection, ModelSection, Recipe, TrainSection

GB = 1e9  # decimal gigabytes, as GPU vendors quote them; a "24 GB" card holds 24 GiB, so verdicts err safe

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


def text_config(config: dict) -> dict:
    """The language model's part of a config: multimodal wrappers (Gemma 3) nest it, and it is what trains."""
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def model_shape(config: dict) -> ModelShape:
    """The shapes that matter, from a transformers config.json dict; QloraError for what is not modelled."""
    config = text_config(config)
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
    config = text_config(config)
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


def lora_parameters(config: dict, r: int, target_modules: list[str] | str, *, use_dora: bool = False) -> int:
    """Adapter parameters: r x (in + out) for each adapted linear (A is r x in, B is out x r), and with DoRA
    one magnitude per output row."""
    shape = model_shape(config)
    linears = shape.linear_shapes()
    per_linear = {name: r * sum(linears[name]) + (linears[name][1] if use_dora else 0) for name in linears}
    return shape.layers * sum(per_linear[name] for name in targeted_linears(target_modules))


def dora_weight_bytes(shape: ModelShape, model: ModelSection, lora: LoraSection) -> int:
    """DoRA's transient peak in each adapted linear: peft dequantizes the base weight (compute dtype), builds
    B @ A and the sum W + scaling x B @ A (fp32 each) to take the rows' norms. One linear at a time."""
    if not lora.use_dora:
        return 0
    linears = shape.linear_shapes()
    largest = max(linears[name][0] * linears[name][1] for name in targeted_linears(lora.target_modules))
    return (BYTES[model.compute_dtype] + 8) * largest


def residual_bytes(model: ModelSection) -> int:
    """Bytes per value of the residual stream: fp32 once peft has upcast the embeddings and norms of a 4-bit base."""
    return 4 if model.load_in_4bit else BYTES[model.compute_dtype]


def quantization_constant_bytes(quantized_parameters: int, *, double_quant: bool) -> float:
    """The absmax constants of 4-bit weights: fp32 per block, or 8-bit per block plus fp32 per 256 blocks."""
    if double_quant:
        return quantized_parameters / BNB_BLOCKSIZE + 4 * quantized_parameters / (
            BNB_BLOCKSIZE * DOUBLE_QUANT_BLOCKSIZE
        )
    return 4 * quantized_parameters / BNB_BLOCKSIZE


def layer_saved_bytes_per_token(shape: ModelShape, model: ModelSection, lora: LoraSection) -> int:
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
    R, s = residual_bytes(model), BYTES[model.compute_dtype]
    d, a, kv, f = shape.hidden, shape.attention_width, shape.kv_width, shape.intermediate
    norms = 2 * (R + 4) * d
    attention = s * (2 * a + 2 * kv) + 4 * shape.heads
    mlp = 3 * R * f
    mask = 1 if lora.dropout > 0 else 0
    linears = shape.linear_shapes()
    # DoRA also keeps the base output and the LoRA output (s x out each) to rescale them by the magnitudes.
    dora = 2 * s if lora.use_dora else 0
    adapters = sum(
        (s + mask) * linears[name][0] + s * lora.r + dora * linears[name][1]
        for name in targeted_linears(lora.target_modules)
    )
    return norms + attention + mlp + adapters


def backward_working_bytes_per_token(shape: ModelShape, model: ModelSection) -> int:
    """Gradients alive while one layer runs backward: incoming and outgoing residual gradients and the
    gradients of the two widest MLP intermediates (gate and up), in the residual dtype."""
    return residual_bytes(model) * (2 * shape.hidden + 2 * shape.intermediate)


def activation_bytes(
    shape: ModelShape, model: ModelSection, lora: LoraSection, train: TrainSection, tokens: int
) -> tuple[int, int]:
    """(activation checkpoints, layer activations) at the peak of backward for `tokens` tokens per micro-batch."""
    per_layer = layer_saved_bytes_per_token(shape, model, lora) * tokens
    working = backward_working_bytes_per_token(shape, model) * tokens
    # Non-reentrant checkpointing keeps only each layer's input.
    checkpoint_per_layer = residual_bytes(model) * shape.hidden * tokens
    if train.gradient_checkpointing:
        kept = min(shape.layers, OFFLOAD_STASH_TENSORS) if train.activation_offloading else shape.layers
        return kept * checkpoint_per_layer, per_layer + working
    # Offloading without checkpointing brings each layer's tensors back for its backward, one layer at a time.
    return 0, (per_layer if train.activation_offloading else shape.layers * per_layer) + working


def lm_head_loss_bytes(shape: ModelShape, model: ModelSection, tokens: int, *, fused: bool) -> int:
    """The LM head's inputs, logits (a tile of them when fused) and the loss's gradients."""
    s, R = BYTES[model.compute_dtype], residual_bytes(model)
    # What the LM head keeps: the final norm's input and output (the head's input) in the residual dtype.
    head_inputs = 2 * R * shape.hidden * tokens
    if not fused:
        # compute-dtype logits, their fp32 upcast for the loss and its fp32 gradient: 10 bytes per vocab entry.
        return head_inputs + 10 * shape.vocab * tokens
    tile = s * min(tokens, FUSED_HEAD_TOKENS) * min(shape.vocab, FUSED_HEAD_VOCAB)
    # The fp32 head is cast to the compute dtype one vocabulary chunk at a time; backward accumulates the
    # hidden-state gradient in fp32.
    head_chunk = s * min(shape.vocab, FUSED_HEAD_VOCAB) * shape.hidden if model.load_in_4bit and s != 4 else 0
    return head_inputs + tile + head_chunk + 4 * shape.hidden * tokens


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
    dora_weights: int  # DoRA's per-linear weight temporaries (0 without DoRA)
    # What the prediction was made from, so suggestions can re-estimate with one thing changed.
    config: dict = field(repr=False, compare=False)
    recipe: Recipe = field(repr=False, compare=False)
    tokens_per_micro_batch: int
    fused_lm_head: bool

    @property
    def allocated(self) -> int:
        """What torch's caching allocator hands out at the peak: every term but the context and the slack."""
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
            + self.dora_weights
        )

    @property
    def cuda_context(self) -> int:
        return CUDA_CONTEXT_BYTES

    @property
    def allocator_slack(self) -> int:
        return int(ALLOCATOR_SLACK * self.allocated)

    @property
    def total(self) -> int:
        return self.allocated + self.cuda_context + self.allocator_slack


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
    if train.method != "sft":  # DPO and ORPO run each pair's chosen and rejected answers as one batch
        tokens *= 2
    lora = lora_parameters(config, recipe.lora.r, recipe.lora.target_modules, use_dora=recipe.lora.use_dora)
    if lora == 0:
        raise QloraError(
            f"lora.target_modules: none of {recipe.lora.target_modules} is a linear layer of a {shape.model_type or 'Llama-style'} "
            f"decoder ({', '.join(LINEAR_NAMES)}), or use 'all-linear'"
        )

    quantized = counts["linear"]
    if model.load_in_4bit:
        quantized_weights = quantized // 2  # two 4-bit weights per byte
        constants = int(quantization_constant_bytes(quantized, double_quant=model.double_quant))
        unquantized = 4 * (counts["total"] - quantized)
        largest_linear = max(fan_in * fan_out for fan_in, fan_out in shape.linear_shapes().values())
        # bitsandbytes dequantizes one weight to run a large matmul.
        dequantized_buffer = BYTES[model.compute_dtype] * largest_linear
    else:
        quantized_weights = constants = dequantized_buffer = 0
        unquantized = BYTES[model.compute_dtype] * counts["total"]
    checkpoints, layer_activations = activation_bytes(shape, model, recipe.lora, train, tokens)
    return Estimate(
        quantized_weights=quantized_weights,
        quantization_constants=constants,
        unquantized_weights=unquantized,
        lora_weights=4 * lora,
        lora_gradients=4 * lora,
        optimizer_states=int(OPTIMIZER_BYTES_PER_PARAM[train.optim] * lora),
        activation_checkpoints=checkpoints,
        layer_activations=layer_activations,
        dequantized_weight_buffer=dequantized_buffer,
        lm_head_loss=lm_head_loss_bytes(shape, model, tokens, fused=fused_lm_head),
        dora_weights=dora_weight_bytes(shape, model, recipe.lora),
        config=config,
        recipe=recipe,
        tokens_per_micro_batch=tokens,
        fused_lm_head=fused_lm_head,
    )


def predicted_max_allocated(estimate_: Estimate) -> int:
    """The figure a GPU run's torch.cuda.max_memory_allocated() should match: what the allocator hands out,
    less paged optimizer state (bitsandbytes allocates it as CUDA managed memory, outside torch's allocator)."""
    paged = estimate_.optimizer_states if estimate_.recipe.train.optim in PAGED_OPTIMIZERS else 0
    return estimate_.allocated - paged
