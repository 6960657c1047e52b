"""The real stack on CPU: NF4 load through bitsandbytes, LoRA, TRL steps, export; and the dry run, which loads
no weights (an empty skeleton), so it is no pipeline test."""

import json

import pytest
import torch
from helpers import write_recipe
from safetensors.torch import load_file
from trl import SFTTrainer

from qlora_cli import train
from qlora_cli.data import build_dataset
from qlora_cli.errors import QloraError
from qlora_cli.lora import attach_lora, human_count
from qlora_cli.model import check_device, load_model, load_tokenizer, resolve_model_dir
from qlora_cli.plan import lora_parameters
from qlora_cli.recipe import load_recipe


@pytest.mark.pipeline
def test_training_moves_only_lora_weights_and_lora_b_leaves_zero(tmp_path, tiny_base):
    recipe = load_recipe(
        write_recipe(tmp_path, train={"max_steps": 3, "lr": 1.0e-2}, data={"max_rows": 64, "eval_path": None})
    )
    model_dir = resolve_model_dir(recipe.model)
    tokenizer = load_tokenizer(model_dir, recipe.model)
    model = load_model(recipe.model, model_dir, device=check_device(recipe.model))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert model.model.layers[0].self_attn.q_proj.weight.quant_type == "nf4"
    model = attach_lora(model, recipe.lora, gradient_checkpointing=True)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    data = build_dataset(recipe.data, tokenizer)
    trainer = SFTTrainer(
        model=model, args=train.sft_config(recipe, use_cpu=True), train_dataset=data.train, processing_class=tokenizer
    )
    trainer.train()
    changed = {name for name, param in model.named_parameters() if not torch.equal(param.detach(), before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert all(name in changed for name in before if "lora_B" in name), "every lora_B must move off zero"
    assert all(not before[name].any() for name in before if "lora_B" in name)


def test_dry_run_shows_mask_and_counts_and_writes_nothing(tmp_path, tiny_base, capsys):
    recipe = load_recipe(write_recipe(tmp_path))
    assert train.run(recipe, adapters_dir=str(tmp_path / "adapters"), dry_run=True) is None
    shown = capsys.readouterr().out
    assert "resolved recipe" in shown and "name: tiny" in shown
    assert "EOS (</s>) is a label" in shown
    config = json.loads((tiny_base / "config.json").read_text())
    expected = lora_parameters(config, recipe.lora.r, recipe.lora.target_modules)  # the planner's arithmetic
    assert f"trainable {human_count(expected)} of" in shown
    assert not (tmp_path / "adapters").exists() and not (tmp_path / "runs").exists()


@pytest.mark.pipeline
def test_export_is_a_complete_self_describing_adapter(tmp_path, tiny_base):
    recipe = load_recipe(write_recipe(tmp_path, train={"max_steps": 2}, data={"max_rows": 32}))
    home = tmp_path / "adapters"
    trained = train.run(recipe, adapters_dir=str(home))
    adapter = trained.adapter
    assert trained.report == trained.run_dir / "report.md" and trained.report.is_file()
    files = {path.name for path in adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml", "qlora.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert [path.name for path in home.iterdir()] == ["tiny"]  # no staging leftovers
    meta = json.loads((adapter / "qlora.json").read_text())
    assert meta["base"]["fingerprint"].startswith("sha256:") and meta["base"]["id"] == str(tiny_base)
    assert meta["metrics"]["steps"] == 2 and meta["metrics"]["eval_loss"] > 0
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all("lora_" in key for key in weights)
    assert load_recipe(adapter / "recipe.yaml").lora.name == "tiny"

    exported = {path.name: path.read_bytes() for path in adapter.iterdir()}
    # Called without the recipe's file, the owner is unknown: a free name is offered, never --force.
    with pytest.raises(
        QloraError,
        match=r"already exists \(trained on .*; to keep it, give this one another name: --set lora.name=tiny-2$",
    ):
        train.run(recipe, adapters_dir=str(home))
    assert {path.name: path.read_bytes() for path in adapter.iterdir()} == exported  # the refusal touched nothing
