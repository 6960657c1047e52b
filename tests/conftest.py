"""Offline by design: no hub, no network. Tests run the real libraries on the shipped tiny base."""

import os

# Before anything imports Hugging Face code: a test that reaches for the hub must fail, not download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

import qlora_cli  # noqa: E402,F401  (sets OMP_WAIT_POLICY before torch loads)

# isort: split

# Mistral's real tokenizers (tests/real_tokenizers.py) as fixtures for every module.
pytest_plugins = ["real_tokenizers"]

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny"


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    assert (TINY / "base" / "model.safetensors").is_file(), "the shipped tiny base is missing: python -m tools.pretrain"
    return TINY / "base"


def write_recipe(folder: Path, name: str = "tiny", **sections) -> Path:
    """A small recipe on the shipped tiny base; keyword sections override keys, e.g. train={"max_steps": 4}."""
    recipe = yaml.safe_load((REPO / "recipes" / "tiny-sql.yaml").read_text())
    recipe["model"]["id"] = str(TINY / "base")
    recipe["data"]["path"] = str(TINY / "sql" / "train.jsonl")
    recipe["data"]["eval_path"] = str(TINY / "sql" / "test.jsonl")
    recipe["lora"]["name"] = name
    recipe["train"]["output_dir"] = str(folder / "runs" / name)
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def trained_adapters(tmp_path_factory) -> Path:
    """The demo's two adapters (sql, json), trained once per session with the shipped recipes, shortened
    to two epochs so the suite stays within CI's budget (the demo trains three)."""
    from qlora_cli import train
    from qlora_cli.recipe import load_recipe

    home = tmp_path_factory.mktemp("adapters")
    runs = tmp_path_factory.mktemp("runs")
    for task in ("sql", "json"):
        recipe = load_recipe(
            REPO / "recipes" / f"tiny-{task}.yaml", [f"train.output_dir={runs / task}", "train.epochs=2.0"]
        )
        train.run(recipe, adapters_dir=str(home))
    return home
