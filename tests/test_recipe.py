from pathlib import Path

import pytest
import yaml

from qlora_cli.errors import QloraError
from qlora_cli.lora import lora_config
from qlora_cli.model import bnb_config
from qlora_cli.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def minimal(tmp_path: Path, **extra) -> dict:
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    recipe = {"model": {"id": "org/model"}, "data": {"path": str(data)}}
    for section, values in extra.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def error_of(tmp_path: Path, recipe, overrides=()) -> str:
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe)
    with pytest.raises(QloraError) as caught:
        load_recipe(write(tmp_path, text), overrides)
    return str(caught.value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert path.read_text().startswith(f"# qlora train recipes/{path.name}")
    assert recipe.lora.r > 0


def test_real_recipe_is_the_qlora_setup():
    recipe = load_recipe(REPO / "recipes" / "mistral7b-alpaca.yaml")
    assert recipe.model.id == "mistralai/Mistral-7B-Instruct-v0.2"
    assert (recipe.model.quant_type, recipe.model.double_quant, recipe.model.compute_dtype) == ("nf4", True, "bfloat16")
    assert (recipe.lora.r, recipe.train.optim, recipe.data.max_length) == (64, "paged_adamw_32bit", 2048)


def test_defaults_come_from_the_recipe_name(tmp_path):
    recipe = load_recipe(write(tmp_path, yaml.safe_dump(minimal(tmp_path)), "support-bot.yaml"))
    assert recipe.lora.name == "support-bot"
    assert recipe.train.output_dir == "runs/support-bot"
    assert recipe.train.optim == "paged_adamw_32bit"


def test_unknown_keys_get_did_you_mean_and_all_errors_at_once(tmp_path):
    message = error_of(
        tmp_path, minimal(tmp_path, lora={"rank": 8, "dropout": 1.5}, train={"learning_rate": 1.0, "epochz": 2})
    )
    assert "4 problem(s)" in message
    assert "lora.rank: unknown key; did you mean 'r'?" in message
    assert "train.learning_rate: unknown key; did you mean 'lr'?" in message
    assert "train.epochz: unknown key; did you mean 'epochs'?" in message
    assert "lora.dropout" in message


@pytest.mark.parametrize(
    "section, values, key",
    [
        ("lora", {"r": 0}, "lora.r"),
        ("lora", {"alpha": -1}, "lora.alpha"),
        ("lora", {"dropout": 1.0}, "lora.dropout"),
        ("lora", {"target_modules": []}, "lora.target_modules"),
        ("lora", {"name": "../evil"}, "lora.name"),
        ("train", {"lr": 0}, "train.lr"),
        ("train", {"batch_size": "four"}, "train.batch_size"),
        ("model", {"quant_type": "int3"}, "model.quant_type"),
    ],
)
def test_bad_values_name_their_key(tmp_path, section, values, key):
    assert key in error_of(tmp_path, minimal(tmp_path, **{section: values}))


def test_contradictory_quantization_flags(tmp_path):
    message = error_of(tmp_path, minimal(tmp_path, model={"load_in_4bit": False, "double_quant": True}))
    assert "model: double_quant only apply with load_in_4bit: true" in message


def test_remote_code_needs_a_pinned_revision(tmp_path):
    assert "pinned revision" in error_of(tmp_path, minimal(tmp_path, model={"trust_remote_code": True}))
    recipe = minimal(tmp_path, model={"trust_remote_code": True, "revision": "0123abcd"})
    assert load_recipe(write(tmp_path, yaml.safe_dump(recipe))).model.trust_remote_code


def test_access_token_in_a_recipe_is_refused(tmp_path):
    message = error_of(tmp_path, minimal(tmp_path, model={"revision": "hf_" + "a1B2" * 9}))
    assert "model.revision" in message and "HF_TOKEN" in message
    assert "a1B2a1B2" not in message  # the token itself is never echoed


def test_malformed_yaml_reports_line_and_column(tmp_path):
    assert "line 3, column 1" in error_of(tmp_path, "model:\n  id: x\n\tbad: 1\n")


def test_recipe_must_be_a_mapping(tmp_path):
    assert "must be a mapping" in error_of(tmp_path, "- model\n- lora\n")


def test_missing_data_file_is_reported_with_schema_errors(tmp_path):
    message = error_of(tmp_path, {"model": {"id": "org/m"}, "data": {"path": "nope.jsonl"}, "lora": {"r": 0}})
    assert "data.path: file not found: nope.jsonl" in message and "lora.r" in message


def test_overrides_are_typed_and_checked(tmp_path):
    path = write(tmp_path, yaml.safe_dump(minimal(tmp_path)))
    recipe = load_recipe(path, ["lora.r=8", "train.lr=1.0e-4", "lora.target_modules=[q_proj, v_proj]"])
    assert (recipe.lora.r, recipe.train.lr, recipe.lora.target_modules) == (8, 1.0e-4, ["q_proj", "v_proj"])
    with pytest.raises(QloraError, match="section.key=value"):
        load_recipe(path, ["lr=1"])
    with pytest.raises(QloraError, match="lora.rr: unknown key; did you mean 'r'"):
        load_recipe(path, ["lora.rr=8"])


def test_translators_carry_every_field(tmp_path):
    recipe = load_recipe(
        write(tmp_path, yaml.safe_dump(minimal(tmp_path, lora={"r": 8, "alpha": 16, "target_modules": ["q_proj"]})))
    )
    quant = bnb_config(recipe.model)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert str(quant.bnb_4bit_compute_dtype) == "torch.bfloat16"
    lora = lora_config(recipe.lora)
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (8, 16, {"q_proj"})


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_training_that_merge_cannot_carry_is_refused_before_training(tmp_path, bias):
    message = error_of(tmp_path, minimal(tmp_path, lora={"bias": bias}))
    assert "lora.bias" in message and "merge" in message


def test_invalid_rows_takes_fail_or_drop(tmp_path):
    assert load_recipe(write(tmp_path, yaml.safe_dump(minimal(tmp_path)))).data.invalid_rows == "fail"
    assert "data.invalid_rows" in error_of(tmp_path, minimal(tmp_path, data={"invalid_rows": "skip"}))


@pytest.mark.parametrize("name", ["none", "mix", "None"])
def test_adapter_names_that_mean_the_base_or_a_mix_are_refused(tmp_path, name):
    message = error_of(tmp_path, minimal(tmp_path, lora={"name": name}))
    assert "lora.name" in message and "reserved" in message
