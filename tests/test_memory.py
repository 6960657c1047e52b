"""The memory model: parameter counts against published sizes, and how the predicted peak responds to each
recipe setting. Pure arithmetic on config dicts: no files, no torch."""

from __future__ import annotations

import pytest
from helpers import MISTRAL_7B, MISTRAL_RECIPE

from qlora_cli import memory
from qlora_cli.errors import QloraError
from qlora_cli.recipe import load_recipe

LLAMA_3_8B = {**MISTRAL_7B, "model_type": "llama", "vocab_size": 128256}
# q/k/v biases hard-coded by the architecture
QWEN_2_5_7B = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
# four norms per layer, head_dim wider than hidden / heads, embeddings tied by the class default
GEMMA_2_2B = {
    "model_type": "gemma2",
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "vocab_size": 256000,
}
# per-head query and key norms
QWEN_3_8B = {
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
}


def mistral_recipe(*overrides: str):
    return load_recipe(MISTRAL_RECIPE, list(overrides))


def activations(estimate: memory.Estimate) -> int:
    return estimate.activation_checkpoints + estimate.layer_activations


@pytest.mark.parametrize(
    ("config", "published"),
    [
        (MISTRAL_7B, 7_241_732_096),
        (LLAMA_3_8B, 8_030_261_248),
        (QWEN_2_5_7B, 7_615_616_512),
        (GEMMA_2_2B, 2_614_341_888),
        (QWEN_3_8B, 8_190_735_360),
    ],
    ids=["mistral-7b", "llama-3-8b", "qwen2.5-7b", "gemma-2-2b", "qwen3-8b"],
)
def test_parameter_counts_match_the_published_sizes(config, published):
    assert memory.count_parameters(config)["total"] == published


def test_tied_embeddings_have_no_separate_head_and_gemma_ties_by_default():
    untied = memory.count_parameters(MISTRAL_7B)
    assert untied["embeddings"] == untied["lm_head"] == 32000 * 4096
    assert memory.count_parameters({**MISTRAL_7B, "tie_word_embeddings": True})["lm_head"] == 0
    gemma = {key: value for key, value in MISTRAL_7B.items() if key != "tie_word_embeddings"} | {"model_type": "gemma"}
    assert memory.count_parameters(gemma)["lm_head"] == 0


def test_multimodal_configs_are_counted_by_their_language_model():
    wrapped = {"model_type": "gemma3", "vision_config": {"hidden_size": 1152}, "text_config": QWEN_3_8B}
    assert memory.count_parameters(wrapped) == memory.count_parameters(QWEN_3_8B)


def test_lora_parameter_counts_match_peft():
    # peft's print_trainable_parameters on Mistral-7B: r=64 on every linear, and r=8 on q_proj and v_proj
    assert memory.lora_parameters(MISTRAL_7B, 64, "all-linear") == 167_772_160
    assert memory.lora_parameters(MISTRAL_7B, 8, ["self_attn.q_proj", "v_proj"]) == 3_407_872


def test_mistral_recipe_fits_24_gb_with_the_expected_floor():
    estimate = memory.estimate(MISTRAL_7B, mistral_recipe())
    assert estimate.tokens_per_micro_batch == 4 * 2048
    assert estimate.quantized_weights / memory.GB == pytest.approx(3.49, abs=0.01)
    assert estimate.quantization_constants / memory.GB == pytest.approx(0.11, abs=0.01)
    # peft's prepare_model_for_kbit_training keeps embeddings, head and norms in fp32: twice their 0.52 GB in bf16.
    assert estimate.unquantized_weights / memory.GB == pytest.approx(1.05, abs=0.01)
    lora_state = estimate.lora_weights + estimate.lora_gradients + estimate.optimizer_states
    assert 2.0 <= lora_state / memory.GB <= 2.7
    assert estimate.total < 24 * memory.GB


def test_double_quantization_saves_about_a_third_of_a_bit_per_weight():
    single = memory.estimate(MISTRAL_7B, mistral_recipe("model.double_quant=false")).quantization_constants
    double = memory.estimate(MISTRAL_7B, mistral_recipe()).quantization_constants
    quantized = memory.count_parameters(MISTRAL_7B)["linear"]
    assert 8 * (single - double) / quantized == pytest.approx(0.37, abs=0.01)


def test_turning_off_checkpointing_raises_activations_a_lot():
    checkpointed = memory.estimate(MISTRAL_7B, mistral_recipe())
    full = memory.estimate(MISTRAL_7B, mistral_recipe("train.gradient_checkpointing=false"))
    assert full.activation_checkpoints == 0
    assert activations(full) > 5 * activations(checkpointed)


def test_8bit_optimizer_shrinks_optimizer_state_about_4x():
    paged_32 = memory.estimate(MISTRAL_7B, mistral_recipe()).optimizer_states
    paged_8 = memory.estimate(MISTRAL_7B, mistral_recipe("train.optim=paged_adamw_8bit")).optimizer_states
    assert 3.5 < paged_32 / paged_8 <= 4.0


def test_doubling_the_batch_roughly_doubles_activations():
    batch_4 = memory.estimate(MISTRAL_7B, mistral_recipe())
    batch_8 = memory.estimate(MISTRAL_7B, mistral_recipe("train.batch_size=8"))
    assert batch_8.tokens_per_micro_batch == 2 * batch_4.tokens_per_micro_batch
    assert 1.9 < activations(batch_8) / activations(batch_4) < 2.1


def test_activation_offloading_moves_checkpoints_off_the_gpu():
    on_gpu = memory.estimate(MISTRAL_7B, mistral_recipe())
    offloaded = memory.estimate(MISTRAL_7B, mistral_recipe("train.activation_offloading=true"))
    assert offloaded.activation_checkpoints < on_gpu.activation_checkpoints / 4


def test_unfused_logits_cost_about_320_kb_per_token():
    fused = memory.estimate(MISTRAL_7B, mistral_recipe())
    unfused = memory.estimate(MISTRAL_7B, mistral_recipe(), fused_lm_head=False)
    assert 320_000 < unfused.lm_head_loss / unfused.tokens_per_micro_batch < 360_000
    assert fused.lm_head_loss < unfused.lm_head_loss / 2


def test_16bit_base_has_no_quantized_terms():
    estimate = memory.estimate(MISTRAL_7B, mistral_recipe("model.load_in_4bit=false"))
    assert estimate.quantized_weights == estimate.quantization_constants == estimate.dequantized_weight_buffer == 0
    assert estimate.unquantized_weights == 2 * 7_241_732_096


def test_predicted_max_allocated_leaves_out_what_torch_does_not_count():
    paged = memory.estimate(MISTRAL_7B, mistral_recipe())  # paged optimizer: CUDA managed memory
    expected = paged.total - paged.cuda_context - paged.allocator_slack - paged.optimizer_states
    assert memory.predicted_max_allocated(paged) == expected
    # The same optimizer without paging allocates its state through torch.
    unpaged = memory.estimate(MISTRAL_7B, mistral_recipe("train.optim=adamw_torch"))
    assert unpaged.optimizer_states == paged.optimizer_states
    assert memory.predicted_max_allocated(unpaged) == expected + paged.optimizer_states


def test_moe_and_unmatched_targets_are_refused():
    with pytest.raises(QloraError, match="Mixture-of-Experts models are not covered"):
        memory.count_parameters({**MISTRAL_7B, "num_local_experts": 8})
    with pytest.raises(QloraError, match=r"lora.target_modules: none of \['c_attn'\] is a linear layer"):
        memory.estimate(MISTRAL_7B, mistral_recipe("lora.target_modules=[c_attn]"))
    with pytest.raises(QloraError, match="model config lacks intermediate_size"):
        memory.count_parameters({key: value for key, value in MISTRAL_7B.items() if key != "intermediate_size"})
