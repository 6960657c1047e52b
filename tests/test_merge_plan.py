"""The merge's plan, before any weight is read: which LoRA factors fold into which base weight, and with what
scaling. Pure; tests/test_merge.py runs the merge itself."""

import pytest
import torch

from qlora_cli import merge
from qlora_cli.errors import QloraError


def test_lora_plan_follows_peft_scaling_and_rejects_strangers():
    prefix = "base_model.model.model.layers.0."
    weights = {
        f"{prefix}self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
        f"{prefix}self_attn.q_proj.lora_B.weight": torch.zeros(8, 4),
        f"{prefix}mlp.down_proj.lora_A.weight": torch.zeros(2, 8),
        f"{prefix}mlp.down_proj.lora_B.weight": torch.zeros(8, 2),
    }
    base_keys = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"}
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"down_proj": 6}}
    plan = merge.plan_lora_updates(weights, config, base_keys, "x")
    q_proj = merge.LoraUpdate(f"{prefix}self_attn.q_proj.lora_A.weight", f"{prefix}self_attn.q_proj.lora_B.weight", 2.0)
    assert plan["model.layers.0.self_attn.q_proj.weight"] == q_proj
    assert plan["model.layers.0.mlp.down_proj.weight"].scaling == 3.0
    rslora = merge.plan_lora_updates(weights, {"r": 4, "lora_alpha": 8, "use_rslora": True}, base_keys, "x")
    assert rslora["model.layers.0.self_attn.q_proj.weight"].scaling == 4.0

    with pytest.raises(QloraError, match="which the base does not have"):
        merge.plan_lora_updates(weights, config, {"model.layers.0.self_attn.q_proj.weight"}, "x")
    with pytest.raises(QloraError, match="not a LoRA factor"):
        merge.plan_lora_updates(
            {**weights, "base_model.model.lm_head.modules_to_save.weight": torch.zeros(1)}, config, base_keys, "x"
        )
    merge.check_supported({"peft_type": "LORA", "use_dora": True}, "x")  # DoRA merges: its magnitudes fold in
    magnitudes = {
        f"{prefix}{module}.lora_magnitude_vector": torch.ones(8) for module in ("self_attn.q_proj", "mlp.down_proj")
    }
    dora = merge.plan_lora_updates({**weights, **magnitudes}, {**config, "use_dora": True}, base_keys, "x")
    assert (
        dora["model.layers.0.self_attn.q_proj.weight"].magnitude_key
        == f"{prefix}self_attn.q_proj.lora_magnitude_vector"
    )
    with pytest.raises(QloraError, match="DoRA adapter without a magnitude"):
        merge.plan_lora_updates(weights, {**config, "use_dora": True}, base_keys, "x")
