"""`qlora plan`: parameter counts, the memory model's behaviour, suggestions, config resolution, and no torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from qlora_cli import plan
from qlora_cli.errors import QloraError
from qlora_cli.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
MISTRAL_RECIPE = REPO / "recipes" / "mistral7b-alpaca.yaml"
MISTRAL_7B = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
LLAMA_3_8B = {**MISTRAL_7B, "model_type": "llama", "vocab_size": 128256}


def mistral_recipe(*overrides: str):
    return load_recipe(MISTRAL_RECIPE, list(overrides))


def activations(estimate: plan.Estimate) -> int:
    return estimate.activation_checkpoints + estimate.layer_activations


def test_parameter_counts_match_the_published_sizes():
    mistral = plan.count_parameters(MISTRAL_7B)
    assert mistral["linear_per_layer"] == {
        "q_proj": 4096 * 4096,
        "k_proj": 4096 * 1024,
        "v_proj": 4096 * 1024,
        "o_proj": 4096 * 4096,
        "gate_proj": 4096 * 14336,
        "up_proj": 4096 * 14336,
        "down_proj": 14336 * 4096,
    }
    assert mistral["embeddings"] == mistral["lm_head"] == 32000 * 4096
    assert mistral["norms"] == 32 * 2 * 4096 + 4096
    assert mistral["total"] == 7_241_732_096  # 7.24 B
    assert plan.count_parameters(LLAMA_3_8B)["total"] == 8_030_261_248  # 8.03 B


def test_tied_embeddings_have_no_separate_head_and_gemma_ties_by_default():
    assert plan.count_parameters({**MISTRAL_7B, "tie_word_embeddings": True})["lm_head"] == 0
    gemma = {key: value for key, value in MISTRAL_7B.items() if key != "tie_word_embeddings"} | {"model_type": "gemma"}
    assert plan.count_parameters(gemma)["lm_head"] == 0


def test_lora_parameter_counts():
    assert plan.lora_parameters(MISTRAL_7B, 64, "all-linear") == 167_772_160
    assert plan.lora_parameters(MISTRAL_7B, 64, ["q_proj", "v_proj"]) == 32 * 64 * ((4096 + 4096) + (4096 + 1024))


def test_mistral_recipe_fits_24_gb_with_the_expected_floor():
    estimate = plan.estimate(MISTRAL_7B, mistral_recipe())
    assert estimate.tokens_per_micro_batch == 4 * 2048
    assert estimate.quantized_weights / plan.GB == pytest.approx(3.49, abs=0.01)
    assert estimate.quantization_constants / plan.GB == pytest.approx(0.11, abs=0.01)
    # peft's prepare_model_for_kbit_training keeps embeddings, head and norms in fp32: twice ANCHORS' bf16 0.52 GB.
    assert estimate.unquantized_weights / plan.GB == pytest.approx(1.05, abs=0.01)
    lora_state = estimate.lora_weights + estimate.lora_gradients + estimate.optimizer_states
    assert 2.0 <= lora_state / plan.GB <= 2.7
    assert estimate.total < 24 * plan.GB


def test_turning_off_checkpointing_raises_activations_a_lot():
    checkpointed = plan.estimate(MISTRAL_7B, mistral_recipe())
    full = plan.estimate(MISTRAL_7B, mistral_recipe("train.gradient_checkpointing=false"))
    assert full.activation_checkpoints == 0
    assert activations(full) > 5 * activations(checkpointed)


def test_8bit_optimizer_shrinks_optimizer_state_about_4x():
    paged_32 = plan.estimate(MISTRAL_7B, mistral_recipe()).optimizer_states
    paged_8 = plan.estimate(MISTRAL_7B, mistral_recipe("train.optim=paged_adamw_8bit")).optimizer_states
    assert 3.5 < paged_32 / paged_8 <= 4.0


def test_doubling_the_batch_roughly_doubles_activations():
    batch_4 = plan.estimate(MISTRAL_7B, mistral_recipe())
    batch_8 = plan.estimate(MISTRAL_7B, mistral_recipe("train.batch_size=8"))
    assert batch_8.tokens_per_micro_batch == 2 * batch_4.tokens_per_micro_batch
    assert 1.9 < activations(batch_8) / activations(batch_4) < 2.1


def test_activation_offloading_moves_checkpoints_off_the_gpu():
    on_gpu = plan.estimate(MISTRAL_7B, mistral_recipe())
    offloaded = plan.estimate(MISTRAL_7B, mistral_recipe("train.activation_offloading=true"))
    assert offloaded.activation_checkpoints < on_gpu.activation_checkpoints / 4


def test_unfused_logits_cost_about_320_kb_per_token():
    fused = plan.estimate(MISTRAL_7B, mistral_recipe())
    unfused = plan.estimate(MISTRAL_7B, mistral_recipe(), fused_lm_head=False)
    # 32000 vocab x (bf16 logits + fp32 upcast + fp32 gradient), plus the head's fp32 inputs
    assert unfused.lm_head_loss / unfused.tokens_per_micro_batch == 32000 * 10 + 2 * 4 * 4096
    assert fused.lm_head_loss < unfused.lm_head_loss / 2


def test_16bit_base_has_no_quantized_terms():
    estimate = plan.estimate(MISTRAL_7B, mistral_recipe("model.load_in_4bit=false"))
    assert estimate.quantized_weights == estimate.quantization_constants == estimate.dequantized_weight_buffer == 0
    assert estimate.unquantized_weights == 2 * 7_241_732_096


def test_predicted_max_allocated_leaves_out_what_torch_does_not_count():
    estimate = plan.estimate(MISTRAL_7B, mistral_recipe())  # paged optimizer: CUDA managed memory
    expected = estimate.total - estimate.cuda_context - estimate.allocator_slack - estimate.optimizer_states
    assert plan.predicted_max_allocated(estimate) == expected


@pytest.mark.parametrize("budget_gb", [16, 12, 8])
def test_suggestions_each_fit_the_budget(budget_gb):
    recipe = mistral_recipe()
    estimate = plan.estimate(MISTRAL_7B, recipe)
    assert estimate.total > budget_gb * plan.GB
    suggestions = plan.suggest(estimate, budget_gb * plan.GB, recipe)
    assert suggestions
    for suggestion in suggestions:
        peak = float(re.search(r": ([\d.]+) GB$", suggestion).group(1))
        assert peak <= budget_gb


def test_suggestions_name_the_change_and_keep_the_effective_batch():
    recipe = mistral_recipe("train.gradient_checkpointing=false")
    suggestions = plan.suggest(plan.estimate(MISTRAL_7B, recipe), 20 * plan.GB, recipe)
    assert any(s.startswith("train.gradient_checkpointing false -> true") for s in suggestions)
    recipe = mistral_recipe()
    suggestions = plan.suggest(plan.estimate(MISTRAL_7B, recipe), 16 * plan.GB, recipe)
    assert any("train.batch_size 4 -> 2, train.grad_accum 4 -> 8" in s for s in suggestions)


def test_no_suggestion_when_nothing_fits():
    recipe = mistral_recipe()
    assert plan.suggest(plan.estimate(MISTRAL_7B, recipe), 3 * plan.GB, recipe) == []


def test_flops_and_epoch_time():
    assert plan.flops_per_token(MISTRAL_7B, mistral_recipe()) / 1e9 == pytest.approx(46.2, rel=0.01)
    no_checkpointing = mistral_recipe("train.gradient_checkpointing=false")
    assert plan.flops_per_token(MISTRAL_7B, no_checkpointing) / 1e9 == pytest.approx(31.3, rel=0.01)
    assert plan.epoch_time(3_600_000, 1000.0) == 3600.0


def test_moe_and_unmatched_targets_are_refused():
    with pytest.raises(QloraError, match="Mixture-of-Experts"):
        plan.count_parameters({**MISTRAL_7B, "num_local_experts": 8})
    with pytest.raises(QloraError, match="target_modules"):
        plan.estimate(MISTRAL_7B, mistral_recipe("lora.target_modules=[c_attn]"))


def write_recipe(tmp_path: Path, model_id: str) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(f"model:\n  id: {model_id}\ndata:\n  path: org/rows\n  max_length: 1024\ntrain:\n  batch_size: 2\n")
    return path


def test_run_reads_a_local_config_and_renders(tmp_path):
    model_dir = tmp_path / "base"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(MISTRAL_7B))
    recipe = load_recipe(write_recipe(tmp_path, "base"))
    result = plan.run(recipe, gpu_memory_gb=24, tokens_per_second=2000.0, dataset_tokens=7_200_000)
    assert result.config_source == str(model_dir.resolve() / "config.json")
    assert result.fits and result.suggestions == []
    assert result.epoch_seconds == 3600.0
    console = Console(record=True, width=160)
    console.print(plan.render(result))
    text = console.export_text()
    assert "chunked by TRL" in text and "Fits 24.0 GB" in text and "1 h 00 min" in text and "(stated)" in text

    tight = plan.run(recipe, gpu_memory_gb=8, tokens_per_second=None, dataset_tokens=None)
    assert tight.fits is False and tight.suggestions
    assert "assumed" in tight.throughput_source


def test_local_folder_without_config_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(QloraError, match="no config.json"):
        plan.run(
            load_recipe(write_recipe(tmp_path, "empty")),
            gpu_memory_gb=None,
            tokens_per_second=None,
            dataset_tokens=None,
        )


def test_offline_hub_id_says_how_to_point_at_a_local_config(tmp_path):
    # A fresh process, so huggingface_hub reads HF_HUB_OFFLINE and the empty cache at import.
    recipe_path = write_recipe(tmp_path, "someone/never-downloaded-7b")
    script = (
        "from qlora_cli import plan\nfrom qlora_cli.errors import QloraError\nfrom qlora_cli.recipe import load_recipe\n"
        f"try:\n    plan.run(load_recipe({str(recipe_path)!r}), gpu_memory_gb=24, tokens_per_second=None, dataset_tokens=None)\n"
        "except QloraError as error:\n    print(error)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "offline mode is on" in done.stdout and "local folder" in done.stdout and "hf download" in done.stdout


def test_importing_plan_does_not_import_torch():
    check = "import qlora_cli.plan, sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], cwd=REPO, check=True, timeout=60)
