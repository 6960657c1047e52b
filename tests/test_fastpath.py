"""The fast path is only on by default where it is correct: packing keeps examples apart and the loss the same."""

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from conftest import write_recipe
from qlora_cli import train
from qlora_cli.data import build_dataset
from qlora_cli.merge import use_exact_4bit_matmul
from qlora_cli.model import check_device, load_model, load_tokenizer, resolve_model_dir
from qlora_cli.recipe import load_recipe

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base):
    recipe = load_recipe(write_recipe(tmp_path_factory.mktemp("fast"), data={"max_rows": 6, "eval_path": None}))
    model_dir = resolve_model_dir(recipe.model)
    tokenizer = load_tokenizer(model_dir, recipe.model)
    model = load_model(recipe.model, model_dir, device=check_device(recipe.model)).eval()
    use_exact_4bit_matmul(model)  # the same kernel whatever the sequence length, as in training
    return recipe, tokenizer, model, build_dataset(recipe.data, tokenizer).train


def test_packed_examples_do_not_attend_to_each_other(setup):
    _, tokenizer, model, data = setup
    first, second = data[0], data[1]
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([first["input_ids"]])).logits[0]
        packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)([first, second])
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        second_alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
    n = len(first["input_ids"])
    # Leaking attention moves logits by whole units; kernel-order noise stays far below 1e-2.
    assert torch.allclose(together[:n], alone, atol=1e-2)
    assert torch.allclose(together[n:], second_alone, atol=1e-2), "the second example saw the first"


def test_loss_is_the_same_with_and_without_packing(setup):
    recipe, tokenizer, model, data = setup
    examples = [data[i] for i in range(4)]
    losses = {}
    for padding_free in (False, True):
        batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)(examples)
        inputs = {key: value for key, value in batch.items() if key in ("input_ids", "attention_mask", "position_ids", "labels")}
        with torch.no_grad():
            losses[padding_free] = model(**inputs).loss.item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_packing_and_response_only_loss_are_the_defaults(setup):
    recipe, *_ = setup
    config = train.sft_config(recipe, use_cpu=True)
    assert config.packing and config.packing_strategy == "bfd" and recipe.train.packing
    assert config.dataset_kwargs == {"skip_prepare_dataset": False}
    off = train.sft_config(recipe.model_copy(update={"train": recipe.train.model_copy(update={"packing": False})}), use_cpu=True)
    assert not off.packing and off.dataset_kwargs == {"skip_prepare_dataset": True}
