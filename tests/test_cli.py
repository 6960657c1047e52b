import subprocess
import sys
import time
from pathlib import Path

import yaml
from typer.testing import CliRunner

from qlora_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def qlora(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real console entry point, in a subprocess: exit codes and stderr as a user sees them."""
    return subprocess.run([sys.executable, "-m", "qlora_cli", *args], capture_output=True, text=True, cwd=cwd)


def test_help_is_instant_and_imports_no_torch():
    probe = "import sys, qlora_cli.cli; assert not {'torch', 'transformers', 'peft', 'trl'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", probe], check=True)
    started = time.perf_counter()
    result = qlora("--help")
    assert result.returncode == 0 and "train" in result.stdout
    assert time.perf_counter() - started < 5


def test_validate_ok():
    result = runner.invoke(app, ["validate", str(REPO / "recipes" / "mistral7b-alpaca.yaml")])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


def test_bad_recipe_exits_1_naming_the_key_without_traceback(tmp_path):
    recipe = yaml.safe_load((REPO / "recipes" / "tiny-sql.yaml").read_text())
    recipe["lora"]["rank"] = 8
    recipe["model"]["id"] = str(REPO / "recipes" / "tiny" / "base")
    recipe["data"]["path"] = str(REPO / "recipes" / "tiny" / "sql" / "train.jsonl")
    recipe["data"]["eval_path"] = None
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for command in ("validate", "train"):
        result = qlora(command, str(path), cwd=tmp_path)
        assert result.returncode == 1
        assert "lora.rank: unknown key; did you mean 'r'?" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == [path]  # nothing written


def test_missing_recipe_file(tmp_path):
    result = qlora("train", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 1 and "recipe not found: nope.yaml" in result.stderr


def test_recipes_list_show_copy(tmp_path):
    listed = runner.invoke(app, ["recipes", "list"])
    assert listed.exit_code == 0
    for name in ("mistral7b-alpaca", "llama3.1-8b-alpaca", "qwen2.5-14b-sql", "tiny-sql", "tiny-json"):
        assert name in listed.output
    shown = runner.invoke(app, ["recipes", "show", "mistral7b-alpaca"])
    assert shown.exit_code == 0 and "mistralai/Mistral-7B-Instruct-v0.2" in shown.output
    copied = runner.invoke(app, ["recipes", "copy", "tiny-sql", str(tmp_path / "mine.yaml")])
    assert copied.exit_code == 0, copied.output
    assert runner.invoke(app, ["validate", str(tmp_path / "mine.yaml")]).exit_code == 0  # paths still resolve
    again = subprocess.run(
        [sys.executable, "-m", "qlora_cli", "recipes", "copy", "tiny-sql", str(tmp_path / "mine.yaml")],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1 and "already exists" in again.stderr
