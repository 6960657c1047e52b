"""Stage `lora`: attach trainable low-rank adapters to the frozen base."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel

from qlora_cli.errors import QloraError
from qlora_cli.model import sharded_launch, zero3_launch
from qlora_cli.preflight import check_targets, module_linear_names
from qlora_cli.recipe import LoraSection

log = logging.getLogger(__name__)


# lora.init -> peft's init_lora_weights. PiSSA by a fast randomised SVD (16 subspace iterations): the full
# SVD of every weight of a 7B model takes minutes; loftq starts as kaiming, and attach_lora refits A and B.
PEFT_INIT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa_niter_16", "olora": "olora", "loftq": True}
BASE_REWRITING = ("pissa", "olora")  # inits that move part of the base into the adapter at the start


def lora_config(section: LoraSection) -> LoraConfig:
    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        bias=section.bias,
        use_dora=section.use_dora,
        use_rslora=section.use_rslora,
        init_lora_weights=PEFT_INIT[section.init],
        task_type="CAUSAL_LM",
    )


def fit_loftq(peft_model: PeftModel, model_dir: Path) -> int:
    """LoftQ: start each adapter at the best rank-r approximation of what 4-bit quantisation took from its
    weight, so that base + adapter begins as the 16-bit model. peft's replace_lora_weights_loftq does this
    on CUDA only; this runs where the model is. Returns the modules fitted."""
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.nn import Linear4bit
    from safetensors import safe_open

    from qlora_cli.model import weight_files

    where = {}
    for shard in weight_files(model_dir):
        with safe_open(str(shard), "pt") as handle:
            where.update(dict.fromkeys(handle.keys(), shard))
    fitted = 0
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(base, Linear4bit) or "default" not in getattr(module, "lora_A", {}):
            continue
        key = f"{name.removeprefix(prefix)}.weight"
        if key not in where:
            raise QloraError(f"lora.init: loftq needs the 16-bit weight {key}, which {model_dir} does not hold")
        with safe_open(str(where[key]), "pt") as handle:
            original = handle.get_tensor(key).to(base.weight.device, torch.float32)
        quantized = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        rank, scaling = module.r["default"], module.scaling["default"]
        u, s, v = torch.svd_lowrank(original - quantized, q=min(rank + 8, *original.shape), niter=4)
        root = (s[:rank] / scaling).sqrt()
        module.lora_B["default"].weight.data.copy_(u[:, :rank] * root)
        module.lora_A["default"].weight.data.copy_(root.unsqueeze(1) * v[:, :rank].T)
        fitted += 1
    return fitted


def continue_adapter(model: PreTrainedModel, folder: Path, *, gradient_checkpointing: bool) -> PeftModel:
    """An existing adapter on the 4-bit base, trainable again (lora.init_from), on a base prepared as for a
    new one (train refuses init_from under a sharded launch)."""
    model = prepare_base(model, gradient_checkpointing=gradient_checkpointing, sharded=False)
    peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info(
        "continuing adapter %s: trainable %s of %s parameters", folder.name, human_count(trainable), human_count(total)
    )
    return peft_model


def check_target_modules(model: torch.nn.Module, section: LoraSection) -> None:
    """Fail when a listed target matches no linear layer; works on an empty (meta-device) model too."""
    check_targets(section, module_linear_names(model, torch.nn.Linear))


def prepare_base(model: PreTrainedModel, *, gradient_checkpointing: bool, sharded: bool) -> PreTrainedModel:
    """The frozen base, ready for an adapter to train on it."""
    # PEFT under ZeRO-3 trains correctly only with reentrant checkpointing (trl#2514, as TRL enforces).
    checkpointing = {"use_reentrant": zero3_launch()}
    if getattr(model, "is_loaded_in_4bit", False) and not sharded:
        # Freezes the base, upcasts norms and embeddings to fp32 for stable training, and makes the
        # inputs require grad so checkpointed blocks still backpropagate into the adapters.
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
        )
    # A 16-bit base, or FSDP/ZeRO-3: they flatten each wrapped block into one buffer of one dtype ("Must
    # flatten tensors with uniform dtype"), so norms stay in the storage dtype instead of being upcast to fp32.
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
        model.enable_input_require_grads()
    return model


def attach_lora(
    model: PreTrainedModel,
    section: LoraSection,
    *,
    gradient_checkpointing: bool,
    sharded: bool | None = None,
    model_dir: Path | None = None,
) -> PeftModel:
    """`sharded` (default: read from the launcher's environment) means FSDP or DeepSpeed ZeRO-3 will
    shard the model: every parameter then keeps the one dtype the 4-bit weights are stored in.
    `model_dir` holds the base's 16-bit weights, which lora.init: loftq fits the adapter to."""
    sharded = sharded_launch() if sharded is None else sharded
    model = prepare_base(model, gradient_checkpointing=gradient_checkpointing, sharded=sharded)
    check_target_modules(model, section)
    storage = uniform_dtype(model) if sharded else None  # of the base alone, before the adapter is added
    # Trained under peft's "default" slot so the export is a plain, flat peft folder; the adapter's own
    # name lives in its directory name and qlora.json, and generate loads each under that name.
    peft_model = get_peft_model(model, lora_config(section), autocast_adapter_dtype=not sharded)
    if section.init == "loftq":
        if model_dir is None:
            raise QloraError("lora.init: loftq needs the base's 16-bit weights to fit the adapter to")
        log.info("LoftQ: fitted %d adapters to the 4-bit quantisation error", fit_loftq(peft_model, model_dir))
    if storage is not None:
        for param in peft_model.parameters():
            if param.requires_grad:
                param.data = param.data.to(storage)
    adapted = sum(
        1 for _, module in peft_model.named_modules() if hasattr(module, "lora_A") and "default" in module.lora_A
    )
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info(
        "LoRA r=%d on %d modules: trainable %s of %s parameters (%.2f%%)",
        section.r,
        adapted,
        human_count(trainable),
        human_count(total),
        100 * trainable / total,
    )
    return peft_model


def uniform_dtype(model: torch.nn.Module) -> torch.dtype:
    """The one floating dtype a sharded model's frozen parameters share (4-bit storage included)."""
    dtypes = {param.dtype for param in model.parameters() if param.is_floating_point()}
    if len(dtypes) != 1:
        raise QloraError(
            f"FSDP/ZeRO-3 shard parameters of one dtype, but this model holds {', '.join(sorted(map(str, dtypes)))}; "
            "set model.quant_storage equal to model.compute_dtype (bfloat16)"
        )
    return dtypes.pop()


def human_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)
