import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import REPO, write_recipe
from pydantic_core import PydanticUndefined

from qlora_cli.errors import QloraError
from qlora_cli.lora import lora_config
from qlora_cli.model import bnb_config
from qlora_cli.recipe import SHIPPED_RECIPES, Recipe, copy_recipe, load_recipe

SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def minimal(folder: Path) -> dict:
    """The smallest valid recipe: a hub model id and a one-row data file."""
    data = folder / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    return {"model": {"id": "org/model"}, "data": {"path": str(data)}}


def recipe_file(folder: Path, name: str = "r", **sections) -> Path:
    return write_recipe(folder, name, start=minimal(folder), **sections)


def text_file(folder: Path, text: str) -> Path:
    path = folder / "r.yaml"
    path.write_text(text)
    return path


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(QloraError) as caught:
        load_recipe(path, overrides)
    return str(caught.value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert path.read_text().startswith(f"# qlora train recipes/{path.name}")
    assert recipe.lora.r > 0


def test_defaults_come_from_the_recipe_name(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, "support-bot"))
    assert recipe.lora.name == "support-bot"
    assert recipe.train.output_dir == "runs/support-bot"


def test_unknown_keys_get_did_you_mean_and_all_errors_at_once(tmp_path):
    message = error_of(
        recipe_file(tmp_path, lora={"rank": 8, "dropout": 1.5}, train={"learning_rate": 1.0, "epochz": 2})
    )
    assert "4 problem(s)" in message
    assert "lora.rank: unknown key; did you mean 'r'?" in message
    assert "train.learning_rate: unknown key; did you mean 'lr'?" in message
    assert "train.epochz: unknown key; did you mean 'epochs'?" in message
    assert "lora.dropout: Input should be less than 1 (got 1.5)" in message


@pytest.mark.parametrize(
    "section, values, line",
    [
        ("lora", {"r": 0}, "lora.r: Input should be greater than 0 (got 0)"),
        ("lora", {"alpha": -1}, "lora.alpha: Input should be greater than 0 (got -1)"),
        ("lora", {"dropout": 1.0}, "lora.dropout: Input should be less than 1 (got 1.0)"),
        (
            "lora",
            {"target_modules": []},
            "lora.target_modules: list at least one module name, or use 'all-linear' (got [])",
        ),
        (
            "lora",
            {"name": "../evil"},
            "lora.name: adapter name '../evil' must be 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (got '../evil')",
        ),
        ("train", {"lr": 0}, "train.lr: Input should be greater than 0 (got 0)"),
        (
            "train",
            {"batch_size": "four"},
            "train.batch_size: Input should be a valid integer, unable to parse string as an integer (got 'four')",
        ),
        ("model", {"quant_type": "int3"}, "model.quant_type: Input should be 'nf4' or 'fp4' (got 'int3')"),
        ("data", {"invalid_rows": "skip"}, "data.invalid_rows: Input should be 'fail' or 'drop' (got 'skip')"),
    ],
)
def test_bad_values_name_their_key(tmp_path, section, values, line):
    message = error_of(recipe_file(tmp_path, **{section: values}))
    assert message.splitlines() == [f"{tmp_path / 'r.yaml'}: 1 problem(s)", f"  {line}"]


def test_contradictory_quantization_flags(tmp_path):
    message = error_of(recipe_file(tmp_path, model={"load_in_4bit": False, "double_quant": True}))
    assert "model: double_quant only apply with load_in_4bit: true" in message


def test_remote_code_needs_a_pinned_revision(tmp_path):
    assert error_of(recipe_file(tmp_path, model={"trust_remote_code": True})).endswith(
        "\n  model: trust_remote_code: true needs a pinned revision (a commit hash), so the code you run is the code "
        "you read"
    )
    pinned = recipe_file(tmp_path, model={"trust_remote_code": True, "revision": "0123abcd"})
    assert load_recipe(pinned).model.trust_remote_code


def test_access_token_in_a_recipe_is_refused(tmp_path):
    message = error_of(recipe_file(tmp_path, model={"revision": "hf_" + "a1B2" * 9}))
    assert (
        message == "model.revision: looks like an access token; tokens never go in a recipe — export HF_TOKEN instead"
    )
    assert "a1B2a1B2" not in message  # the token itself is never echoed


def test_malformed_yaml_reports_line_and_column(tmp_path):
    assert "line 3, column 1" in error_of(text_file(tmp_path, "model:\n  id: x\n\tbad: 1\n"))


def test_recipe_must_be_a_mapping(tmp_path):
    assert "must be a mapping" in error_of(text_file(tmp_path, "- model\n- lora\n"))


def test_missing_data_file_is_reported_with_schema_errors(tmp_path):
    message = error_of(
        write_recipe(tmp_path, "r", start={"model": {"id": "org/m"}, "data": {"path": "nope.jsonl"}, "lora": {"r": 0}})
    )
    assert "data.path: file not found: nope.jsonl" in message and "lora.r" in message


def test_overrides_are_typed_and_checked(tmp_path):
    path = recipe_file(tmp_path)
    recipe = load_recipe(path, ["lora.r=8", "train.lr=1.0e-4", "lora.target_modules=[q_proj, v_proj]"])
    assert (recipe.lora.r, recipe.train.lr, recipe.lora.target_modules) == (8, 1.0e-4, ["q_proj", "v_proj"])
    with pytest.raises(QloraError, match="section.key=value"):
        load_recipe(path, ["lr=1"])
    with pytest.raises(QloraError, match="lora.rr: unknown key; did you mean 'r'"):
        load_recipe(path, ["lora.rr=8"])


def test_translators_carry_every_field(tmp_path):
    recipe = load_recipe(recipe_file(tmp_path, lora={"r": 8, "alpha": 16, "target_modules": ["q_proj"]}))
    quant = bnb_config(recipe.model)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert str(quant.bnb_4bit_compute_dtype) == "torch.bfloat16"
    lora = lora_config(recipe.lora)
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (8, 16, {"q_proj"})


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_training_that_merge_cannot_carry_is_refused_before_training(tmp_path, bias):
    message = error_of(recipe_file(tmp_path, lora={"bias": bias}))
    assert message.endswith(
        f"\n  lora.bias: {bias!r} trains the base model's biases, which qlora merge cannot fold into the base; "
        f"use none (got {bias!r})"
    )


def test_invalid_rows_may_drop_bad_rows(tmp_path):
    assert load_recipe(recipe_file(tmp_path, data={"invalid_rows": "drop"})).data.invalid_rows == "drop"


@pytest.mark.parametrize("name", ["none", "mix", "None"])
def test_adapter_names_that_mean_the_base_or_a_mix_are_refused(tmp_path, name):
    message = error_of(recipe_file(tmp_path, lora={"name": name}))
    assert message.endswith(
        f"\n  lora.name: adapter name {name!r} is reserved ('none' is the base alone, 'mix' a weighted combination); "
        f"pick another (got {name!r})"
    )


def restated_defaults(path: Path) -> list[str]:
    """Keys a recipe sets to the value the schema would give them anyway (lora.name and train.output_dir
    default from the recipe's file name)."""
    written = yaml.safe_load(path.read_text()) or {}
    recipe = load_recipe(path)
    derived = {("lora", "name"): path.stem, ("train", "output_dir"): f"runs/{recipe.lora.name}"}
    restated = []
    for section, values in written.items():
        fields = Recipe.model_fields[section].annotation.model_fields
        for key, value in (values or {}).items():
            default = derived.get((section, key), fields[key].get_default(call_default_factory=True))
            if default is not PydanticUndefined and value == default:
                restated.append(f"{section}.{key}: {value!r}")
    return restated


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipes_list_only_what_differs_from_the_defaults(path):
    assert restated_defaults(path) == [], f"{path.name} restates defaults; remove them"


def test_a_restated_default_is_flagged(tmp_path):
    recipe = recipe_file(tmp_path, "bot", lora={"name": "bot", "r": 16, "alpha": 8.0}, train={"output_dir": "runs/bot"})
    assert restated_defaults(recipe) == [
        "lora.name: 'bot'",
        "lora.r: 16",
        "train.output_dir: 'runs/bot'",
    ]


def test_a_copied_shipped_recipe_still_loads_from_another_folder(tmp_path, monkeypatch):
    copied = copy_recipe("tiny-sql", tmp_path / "mine.yaml")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(copied)
    assert (recipe.lora.name, recipe.train.output_dir) == ("mine", "runs/mine")  # named after the copy
    assert Path(recipe.model.id) == (SHIPPED_RECIPES / "tiny" / "base").resolve()


def test_a_shipped_recipe_loads_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tiny-sql", "tiny-sql.yaml"):
        recipe = load_recipe(name)
        assert recipe.lora.name == "sql"
        assert Path(recipe.data.path) == (SHIPPED_RECIPES / "tiny" / "sql" / "train.jsonl").resolve()
    recipe_file(tmp_path, "tiny-sql")
    assert load_recipe("tiny-sql.yaml").model.id == "org/model"  # a file in the folder comes first
    message = str(pytest.raises(QloraError, load_recipe, "tiny-sq").value)
    assert message.startswith("recipe not found: tiny-sq;") and "tiny-sql" in message


def test_the_wheel_carries_the_recipes_and_the_tiny_base(tmp_path):
    """A plain (non-editable) install has the shipped recipes, the tiny base and its data, and finds them
    from any folder; the benchmarks and tools stay in the checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("qlora_cli", "recipes"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
    completed = subprocess.run([*build, "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    (wheel,) = (tmp_path / "dist").glob("qlora_cli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        f"qlora_cli/recipes/{path.relative_to(REPO / 'recipes').as_posix()}"
        for path in (REPO / "recipes").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert shipped <= names and "qlora_cli/recipes/tiny/base/model.safetensors" in names
    assert not [name for name in names if name.startswith(("benchmarks/", "tools/"))]

    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere.mkdir()
    probe = (
        "import qlora_cli, sys; from qlora_cli.recipe import SHIPPED_RECIPES, load_recipe; "
        "recipe = load_recipe('tiny-json'); print(qlora_cli.__file__, SHIPPED_RECIPES, recipe.model.id, sep='\\n')"
    )
    environment = {**os.environ, "PYTHONPATH": str(site)}
    completed = subprocess.run(
        [sys.executable, "-c", probe], cwd=elsewhere, env=environment, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    module, recipes, base = completed.stdout.splitlines()
    assert Path(module).is_relative_to(site) and Path(recipes) == site / "qlora_cli" / "recipes"
    assert Path(base) == site / "qlora_cli" / "recipes" / "tiny" / "base"
    listed = subprocess.run(
        [sys.executable, "-m", "qlora_cli", "recipes", "list"],
        cwd=elsewhere,
        env={**environment, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr[-4000:]
    assert all(path.stem in listed.stdout for path in SHIPPED)
