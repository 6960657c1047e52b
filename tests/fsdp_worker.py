"""One rank of a sharded QLoRA run on the CPU (gloo), started by torchrun from tests/test_distributed.py.

accelerate refuses FSDP without a GPU, so the model is wrapped the way transformers' Trainer wraps a
PeftModel under accelerate (peft's auto-wrap policy: each decoder layer and each LoRA layer its own
unit, use_orig_params false), with qlora's own load_model, attach_lora and export."""

import json
import os
import sys
from pathlib import Path

import qlora_cli  # noqa: F401

# isort: split
import torch
import torch.distributed as dist
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import set_seed

from qlora_cli import train
from qlora_cli.lora import attach_lora
from qlora_cli.model import base_model_record, load_model, load_tokenizer, resolve_model_dir
from qlora_cli.recipe import load_recipe


def main(recipe_path: str, adapters: str) -> None:
    assert os.environ.get("ACCELERATE_USE_FSDP") == "true"  # what `accelerate launch` sets for an FSDP config
    dist.init_process_group("gloo")
    recipe = load_recipe(recipe_path)
    train.check_sharding(recipe)
    model_dir = resolve_model_dir(recipe.model)
    model = load_model(recipe.model, model_dir, device=torch.device("cpu"))
    set_seed(recipe.train.seed)
    model = attach_lora(model, recipe.lora, gradient_checkpointing=True)  # sharded: read from the environment
    before = {name: param.detach().clone() for name, param in model.named_parameters() if "lora_" in name}
    wrapped = FSDP(
        model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False, device_id=torch.device("cpu")
    )
    ids = torch.randint(5, 200, (2, 24), generator=torch.Generator().manual_seed(dist.get_rank()))
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    state = train.gathered_adapter_state(wrapped)
    if dist.get_rank() == 0:
        tokenizer = load_tokenizer(model_dir, recipe.model)
        metrics = {"examples": 0, "loss": loss.item()}
        train.export_adapter(
            model,
            tokenizer,
            recipe,
            base_model_record(recipe.model, model_dir),
            metrics,
            Path(adapters) / recipe.lora.name,
            force=False,
            state_dict=state,
        )
        from safetensors.torch import save_file

        save_file(
            {name.replace(".default", ""): tensor.contiguous() for name, tensor in before.items()},
            str(Path(adapters) / "before.safetensors"),
        )
        print(json.dumps({"loss": loss.item(), "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
