import subprocess
import sys

from helpers import REPO, qlora, write_recipe
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.errors import ExitCode

runner = CliRunner()


def heavy_imports_of(argv: list[str], exit_code: int) -> subprocess.CompletedProcess:
    """`qlora ARGV` in a fresh process that then fails unless it exited `exit_code` having loaded no ML library:
    a command that answers at once, checked by what is imported, not by a clock a busy machine could fail."""
    probe = (
        "import sys\n"
        "from qlora_cli.cli import main\n"
        f"sys.argv = ['qlora', *{argv!r}]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as done:\n"
        f"    assert done.code == {exit_code}, done.code\n"
        "heavy = {'torch', 'transformers', 'peft', 'trl', 'bitsandbytes', 'datasets', 'accelerate'} & set(sys.modules)\n"
        "assert not heavy, sorted(heavy)\n"
    )
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)


def test_help_imports_nothing_heavy():
    result = heavy_imports_of(["--help"], 0)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "generate" in result.stdout


def test_train_refuses_an_occupied_adapter_before_loading_any_ml_library(tmp_path):
    recipe = write_recipe(tmp_path, "taken")
    (tmp_path / "adapters" / "taken").mkdir(parents=True)  # someone's own folder under the adapter's name
    result = heavy_imports_of(["train", str(recipe), "--adapters-dir", str(tmp_path / "adapters")], 1)
    assert result.returncode == 0, result.stderr
    assert "adapter" in result.stderr and "taken" in result.stderr


def test_validate_ok():
    path = REPO / "recipes" / "mistral7b-alpaca.yaml"
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"{path}: OK"
    assert "  model: hub id mistralai/Mistral-7B-Instruct-v0.2; not checked offline" in result.output


def test_bad_recipe_exits_1_naming_the_key_without_traceback(tmp_path):
    path = write_recipe(tmp_path, "bad", lora={"rank": 8}, data={"eval_path": None})
    for command in ("validate", "train"):
        result = qlora(command, str(path), cwd=tmp_path)
        assert result.returncode == 1
        assert "lora.rank: unknown key; did you mean 'r'?" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == [path]  # nothing written


def test_missing_recipe_file(tmp_path):
    result = qlora("train", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.startswith("error: recipe not found: nope.yaml; give a recipe file")


def test_recipes_list_show_copy(tmp_path):
    listed = runner.invoke(app, ["recipes", "list"])
    assert listed.exit_code == 0
    names = {line.split()[0] for line in listed.output.splitlines() if line.strip()}
    assert names >= {path.stem for path in (REPO / "recipes").glob("*.yaml")}
    shown = runner.invoke(app, ["recipes", "show", "mistral7b-alpaca"])
    assert shown.exit_code == 0 and "mistralai/Mistral-7B-Instruct-v0.2" in shown.output
    copied = runner.invoke(app, ["recipes", "copy", "tiny-sql", str(tmp_path / "mine.yaml")])
    assert copied.exit_code == 0, copied.output
    assert runner.invoke(app, ["validate", str(tmp_path / "mine.yaml")]).exit_code == 0  # paths still resolve
    again = qlora("recipes", "copy", "tiny-sql", str(tmp_path / "mine.yaml"))
    assert again.returncode == 1
    assert again.stderr == f"error: {tmp_path / 'mine.yaml'} already exists; pass --force to replace it\n"


def test_exit_codes_tell_a_plan_that_does_not_fit_and_a_crash_from_a_user_error(tmp_path):
    tiny = qlora("plan", str(REPO / "recipes" / "tiny-sql.yaml"), "--gpu-memory", "0.000001", cwd=tmp_path)
    assert tiny.returncode == ExitCode.DOES_NOT_FIT, tiny.stderr
    crash = (
        "import sys\n"
        "from qlora_cli import cli\n"
        "@cli.app.command('broken')\n"
        "def broken():\n"
        "    raise RuntimeError('a bug')\n"
        "sys.argv = ['qlora', 'broken']\n"
        "cli.main()\n"
    )
    crashed = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True)
    assert crashed.returncode == ExitCode.CRASH
    assert "Traceback" in crashed.stderr and "RuntimeError: a bug" in crashed.stderr
