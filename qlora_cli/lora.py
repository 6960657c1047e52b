"""Stage `lora`: attach trainable low-rank adapters to the frozen base."""

from __future__ import annotations

import logging

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel

from qlora_cli.errors import QloraError
from qlora_cli.model import sharded_launch, zero3_launch
from qlora_cli.preflight import check_targets, module_linear_names
from qlora_cli.recipe import LoraSection

log = logging.getLogger(__name__)


def lora_config(section: LoraSection) -> LoraConfig:
    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        bias=section.bias,
        task_type="CAUSAL_LM",
    )


def check_target_modules(model: torch.nn.Module, section: LoraSection) -> None:
    """Fail when a listed target matches no linear layer; works on an empty (meta-device) model too."""
    check_targets(section, module_linear_names(model, torch.nn.Linear))


def attach_lora(
    model: PreTrainedModel, section: LoraSection, *, gradient_checkpointing: bool, sharded: bool | None = None
) -> PeftModel:
    """`sharded` (default: read from the launcher's environment) means FSDP or DeepSpeed ZeRO-3 will
    shard the model: every parameter then keeps the one dtype the 4-bit weights are stored in."""
    sharded = sharded_launch() if sharded is None else sharded
    # PEFT under ZeRO-3 trains correctly only with reentrant checkpointing (trl#2514, as TRL enforces).
    checkpointing = {"use_reentrant": zero3_launch()}
    in_4bit = getattr(model, "is_loaded_in_4bit", False)
    if in_4bit and not sharded:
        # Freezes the base, upcasts norms and embeddings to fp32 for stable training, and makes the
        # inputs require grad so checkpointed blocks still backpropagate into the adapters.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
        )
    else:
        # A 16-bit base, or FSDP/ZeRO-3: they flatten each wrapped block into one buffer of one dtype ("Must
        # flatten tensors with uniform dtype"), so norms stay in the storage dtype instead of being upcast to fp32.
        for param in model.parameters():
            param.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
            model.enable_input_require_grads()
    check_target_modules(model, section)
    storage = uniform_dtype(model) if sharded else None  # of the base alone, before the adapter is added
    # Trained under peft's "default" slot so the export is a plain, flat peft folder; the adapter's own
    # name lives in its directory name and qlora.json, and generate loads each under that name.
    peft_model = get_peft_model(model, lora_config(section), autocast_adapter_dtype=not sharded)
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
