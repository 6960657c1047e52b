"""Offline by design: no hub, no network. Tests run the real libraries on the shipped tiny base."""

import os

# Before anything imports Hugging Face code: a test that reaches for the hub must fail, not download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import qlora_cli  # noqa: E402,F401  (sets OMP_WAIT_POLICY before torch loads)

# isort: split

# Mistral's real tokenizers (tests/real_tokenizers.py) as fixtures for every module.
pytest_plugins = ["real_tokenizers"]

from helpers import REPO, TINY  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    assert (TINY / "base" / "model.safetensors").is_file(), "the shipped tiny base is missing: python -m tools.pretrain"
    return TINY / "base"


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """`run_cli(ARGV)`: `qlora ARGV` in this process through the real entry point, as (exit code, stdout, stderr)."""
    from qlora_cli.cli import main

    def run(argv: list[str]) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["qlora", *argv])
        with pytest.raises(SystemExit) as exited:
            main()
        captured = capsys.readouterr()
        return exited.value.code, captured.out, captured.err

    return run


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
