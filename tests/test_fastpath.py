"""The fast path is only on by default where it is correct: packing keeps examples apart and the loss the same.

Packed rows reach attention in two ways. Under sdpa (what `attn_implementation: auto` keeps for CPU training,
generation and merge) transformers builds a dense (tokens x tokens) block-diagonal mask. Under flex attention
(what auto picks for packed training on CUDA) the same boundaries arrive as a BlockMask, with no dense mask.
Both must keep examples apart and the loss unchanged; the CPU runs flex forward-only (torch has no flex backward
on CPU), the `gpu` test trains through it.
"""

import pytest
import torch
from helpers import write_recipe
from torch.nn.attention.flex_attention import BlockMask, create_mask
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from qlora_cli import train
from qlora_cli.data import build_dataset
from qlora_cli.errors import QloraError
from qlora_cli.lora import attach_lora
from qlora_cli.merge import use_exact_4bit_matmul
from qlora_cli.model import attention_implementation, check_device, load_model, load_tokenizer, resolve_model_dir
from qlora_cli.recipe import load_recipe

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# Packing must not move the loss: the packed and the padded batch hold the same tokens and labels, and each
# token sees the same keys; only fp32 summation order differs. Measured on these four examples: packed vs padded
# 7e-8 relative under sdpa, 1.4e-7 for flex-packed vs sdpa-padded (logits within 2e-5). Letting the examples
# attend to each other (an all-ones mask over the packed row) moved this loss by 83% and logits by 20 units.
LOSS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_base):
    recipe = load_recipe(write_recipe(tmp_path_factory.mktemp("fast"), data={"max_rows": 6, "eval_path": None}))
    model_dir = resolve_model_dir(recipe.model)
    tokenizer = load_tokenizer(model_dir, recipe.model)
    return recipe, model_dir, tokenizer, build_dataset(recipe.data, tokenizer).train


def loaded(base, attention: str):
    recipe, model_dir, tokenizer, data = base
    section = recipe.model.model_copy(update={"attn_implementation": attention})
    model = load_model(section, model_dir, device=check_device(section)).eval()
    assert model.config._attn_implementation == attention
    use_exact_4bit_matmul(model)  # the same kernel whatever the sequence length, as in training
    return recipe, tokenizer, model, data


@pytest.fixture(scope="module")
def sdpa_setup(base):
    return loaded(base, "sdpa")


@pytest.fixture(scope="module")
def flex_setup(base):
    return loaded(base, "flex_attention")


@pytest.fixture(scope="module", params=["sdpa", "flex"])
def packed_setup(request):
    """The kernel that runs the packed rows; the references (each example alone, the padded batch) run on sdpa,
    as a run without packing would. All flex tests share one packed batch: a single compile (~30 s cold on 2 cores)."""
    return request.getfixturevalue(f"{request.param}_setup")


def collate(tokenizer, examples, *, padding_free: bool) -> dict:
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)(examples)
    return {
        key: value for key, value in batch.items() if key in ("input_ids", "attention_mask", "position_ids", "labels")
    }


def four_examples(data) -> list[dict]:
    return [data[i] for i in range(4)]


@pytest.mark.pipeline
def test_packed_examples_do_not_attend_to_each_other(packed_setup, sdpa_setup):
    _, tokenizer, model, data = packed_setup
    reference = sdpa_setup[2]
    examples = four_examples(data)
    with torch.no_grad():
        packed = collate(tokenizer, examples, padding_free=True)
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        alone = [reference(input_ids=torch.tensor([example["input_ids"]])).logits[0] for example in examples]
    start = 0
    for index, logits in enumerate(alone):
        # Leaking attention moves logits by whole units; kernel-order noise stays far below 1e-2.
        assert torch.allclose(together[start : start + len(logits)], logits, atol=1e-2), (
            f"example {index} saw the ones before it"
        )
        start += len(logits)
    assert start == len(together)


@pytest.mark.pipeline
def test_loss_is_the_same_with_and_without_packing(packed_setup, sdpa_setup):
    _, tokenizer, model, data = packed_setup
    reference = sdpa_setup[2]
    examples = four_examples(data)
    with torch.no_grad():
        packed = model(**collate(tokenizer, examples, padding_free=True)).loss.item()
        padded = reference(**collate(tokenizer, examples, padding_free=False)).loss.item()
    assert packed == pytest.approx(padded, rel=LOSS_TOLERANCE)


@pytest.mark.pipeline
def test_packed_rows_reach_attention_as_a_block_mask_with_no_dense_mask(flex_setup):
    _, tokenizer, model, data = flex_setup
    packed = collate(tokenizer, four_examples(data), padding_free=True)
    tokens = packed["input_ids"].shape[1]
    received = []
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: received.append(kwargs["attention_mask"]), with_kwargs=True
        )
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(**packed)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(received) == len(model.model.layers)
    for mask in received:
        # Under sdpa this is a (1, 1, tokens, tokens) tensor; a BlockMask indexes blocks of 128 tokens.
        assert isinstance(mask, BlockMask), (
            f"attention got a {type(mask).__name__} of shape {getattr(mask, 'shape', None)}"
        )
        largest = max(item.numel() for item in mask.as_tuple() if isinstance(item, torch.Tensor))
        assert largest < tokens * tokens / 100
    # And it encodes what the dense mask did: each token sees the earlier tokens of its own example only.
    example = (packed["position_ids"][0] == 0).cumsum(0)
    expected = (example[:, None] == example[None, :]) & torch.ones(tokens, tokens, dtype=torch.bool).tril()
    assert torch.equal(create_mask(received[0].mask_mod, 1, 1, tokens, tokens, device="cpu")[0, 0], expected)


def test_auto_attention_is_flex_for_packed_training_on_cuda_only(tmp_path):
    auto = load_recipe(write_recipe(tmp_path)).model
    assert attention_implementation(auto, device=CUDA, packed=True) == "flex_attention"
    # No boundaries to carry (generation, merge, padded batches), or no flex backward (CPU): sdpa.
    assert attention_implementation(auto, device=CUDA, packed=False) == "sdpa"
    assert attention_implementation(auto, device=CPU, packed=True) == "sdpa"
    for explicit in ("sdpa", "eager", "flash_attention_2"):
        assert (
            attention_implementation(
                auto.model_copy(update={"attn_implementation": explicit}), device=CUDA, packed=True
            )
            == explicit
        )
    flex = auto.model_copy(update={"attn_implementation": "flex_attention"})
    assert attention_implementation(flex, device=CPU, packed=False) == "flex_attention"  # forward only: allowed
    with pytest.raises(QloraError, match="model.attn_implementation: flex_attention cannot train on cpu"):
        attention_implementation(flex, device=CPU, packed=True)


def test_sft_config_packs_best_fit_and_skips_preparing_only_unpacked_data(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path))
    config = train.sft_config(recipe, use_cpu=True)
    assert config.packing and config.packing_strategy == "bfd"
    assert config.dataset_kwargs == {"skip_prepare_dataset": False}
    off = train.sft_config(
        recipe.model_copy(update={"train": recipe.train.model_copy(update={"packing": False})}), use_cpu=True
    )
    assert not off.packing and off.dataset_kwargs == {"skip_prepare_dataset": True}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU has no flex attention backward")
def test_packed_training_on_cuda_runs_flex_attention_through_lora_and_checkpointing(base):
    """What auto gives a packed run on CUDA: 4-bit base, flex attention, LoRA, non-reentrant checkpointing, bf16."""
    recipe, model_dir, tokenizer, data = base
    section = recipe.model.model_copy(update={"device": "cuda", "compute_dtype": "bfloat16"})
    model = load_model(section, model_dir, device=CUDA, packed=True)
    assert model.config._attn_implementation == "flex_attention"
    model = attach_lora(model, recipe.lora, gradient_checkpointing=True).train()
    examples = [data[i] for i in range(4)]
    losses = {}
    for padding_free in (False, True):
        batch = {key: value.to(CUDA) for key, value in collate(tokenizer, examples, padding_free=padding_free).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        grads = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
        assert grads and all(grad is not None and torch.isfinite(grad).all() for grad in grads.values())
        assert any(
            grad.abs().sum() > 0 for name, grad in grads.items() if "lora_B" in name
        )  # B starts at zero, A's grads too
        model.zero_grad()
        losses[padding_free] = loss.item()
    # bf16 keeps 8 significant bits: the padded and packed orders of summation differ by up to ~2^-8 per value.
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
