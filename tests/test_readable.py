"""Readable everywhere: every --help has examples and described options, tables fit 80 columns without
cutting a word, the recipe keys are listed from the schema, and `qlora doctor` answers offline in one
pass, every check printed, exiting by its worst check."""

import json
import logging
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import typer
from helpers import TINY, free_port, write_recipe
from rich.console import Console
from typer.testing import CliRunner

from qlora_cli.adapters import render_list, run_list
from qlora_cli.cli import _verbose_first, app
from qlora_cli.recipe import (
    DataSection,
    LoraSection,
    ModelSection,
    TrainSection,
    list_recipes,
    recipe_keys,
    render_recipe_keys,
    render_recipes,
)
from qlora_cli.tables import share_out


def rendered(renderable, width: int = 80) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def assert_fits(text: str, width: int = 80) -> None:
    assert max(len(line) for line in text.splitlines()) <= width, text
    assert "…" not in text, text  # rich's mark of a cut word


def leaf_commands(group, prefix: str = "") -> dict:
    """Every command by its full name ("recipes keys"), from the click group typer builds."""
    found = {}
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # typer ships its own click: a group is known by its subcommands
            found |= leaf_commands(command, f"{prefix}{name} ")
        else:
            found[f"{prefix}{name}"] = command
    return found


COMMANDS = leaf_commands(typer.main.get_command(app))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_help_has_examples_and_every_option_a_description(name):
    command = COMMANDS[name]
    assert re.search(r"Examples?:\n  qlora " + re.escape(name.split()[0]), command.help or ""), command.help
    undescribed = [param.name for param in command.params if not getattr(param, "help", None)]
    assert undescribed == []
    shown = CliRunner().invoke(app, [*name.split(), "--help"], env={"COLUMNS": "80", "TERM": "dumb"})
    assert shown.exit_code == 0
    assert max(len(line) for line in shown.output.splitlines()) <= 80
    assert "qlora " + name.split()[0] in shown.output  # the examples survive the help's rendering


def test_version_prints_the_distribution_version(run_cli):
    code, out, _ = run_cli(["--version"])
    assert (code, out) == (0, f"qlora {version('qlora-cli')}\n")


def test_verbose_works_after_the_command_too(run_cli):
    assert _verbose_first(["train", "x.yaml", "-v", "--set", "a.b=1"]) == ["-v", "train", "x.yaml", "--set", "a.b=1"]
    assert _verbose_first(["generate", "--", "-v"]) == ["generate", "--", "-v"]  # after --, a prompt
    code, out, err = run_cli(["recipes", "keys", "lora", "--verbose"])
    assert code == 0, err
    assert logging.getLogger().level == logging.DEBUG and "lora.r" in out


def test_recipe_keys_come_from_the_schema_with_defaults_and_descriptions():
    keys = {key.key: key for key in recipe_keys()}
    sections = {"model": ModelSection, "lora": LoraSection, "data": DataSection, "train": TrainSection}
    assert set(keys) == {f"{name}.{field}" for name, schema in sections.items() for field in schema.model_fields}
    assert all(key.description for key in keys.values())
    assert (keys["lora.r"].default, keys["model.id"].default, keys["train.report_to"].default) == (
        "16",
        "required",
        "[tensorboard]",
    )
    assert keys["train.output_dir"].default == "runs/<lora.name>"
    assert {key.key for key in recipe_keys("lora")} == {f"lora.{field}" for field in LoraSection.model_fields}
    text = rendered(render_recipe_keys(recipe_keys()))
    assert_fits(text)
    assert all(re.search(rf"^ {re.escape(key)} ", text, re.M) for key in keys)
    assert "[tensorboard]" in text  # a default, not a markup tag swallowed by rich


def test_recipe_keys_names_the_sections_for_an_unknown_one(run_cli):
    code, _, err = run_cli(["recipes", "keys", "optimizer"])
    assert code == 1 and "no recipe section 'optimizer'; sections: model, lora, data, train" in err


def test_recipes_list_fits_80_columns_with_a_purpose_written_for_it():
    recipes = list_recipes()
    assert all(0 < len(recipe.purpose) <= 80 for recipe in recipes), [recipe.purpose for recipe in recipes]
    text = rendered(render_recipes(recipes))
    assert_fits(text)
    assert "recipes in" not in text
    words = text.split()
    for recipe in recipes:
        assert recipe.name in words and recipe.model in words  # whole, never wrapped or cut
        assert all(word in words for word in recipe.purpose.split())


def write_adapter(home: Path, name: str, base: str, data: str, created: str, **metrics) -> None:
    folder = home / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 3_000_000)
    record = {"name": name, "base": {"id": base}, "lora": {"r": 64}, "data": {"path": data}}
    (folder / "qlora.json").write_text(json.dumps({**record, "metrics": metrics, "created": created}))


def test_adapters_list_fits_80_columns_without_cutting_names_or_dates(tmp_path):
    home = tmp_path / "adapters"
    write_adapter(
        home,
        "sql",
        str(TINY / "base"),
        str(TINY / "sql" / "train.jsonl"),
        "2025-06-01T12:34:56+00:00",
        train_loss=0.0213,
        train_loss_steps=[281, 282],
    )
    write_adapter(
        home,
        "mistral7b-alpaca",
        "mistralai/Mistral-7B-Instruct-v0.2",
        "vicgalle/alpaca-gpt4",
        "2025-06-02T08:00:00+00:00",
        train_loss=1.234,
        train_loss_steps=[91, 100],
        mean_train_loss=1.9,
    )
    # Trained before final losses were recorded: its train_loss is the run's average, and says so.
    write_adapter(
        home,
        "qwen-sql",
        "Qwen/Qwen2.5-14B-Instruct",
        "b-mc2/sql-create-context",
        "2025-06-03T09:10:00+00:00",
        train_loss=2.5,
    )
    text = rendered(render_list(run_list(home)))
    assert_fits(text)
    words = text.split()
    assert {"sql", "mistral7b-alpaca", "qwen-sql", "2025-06-01", "2025-06-02", "2025-06-03"} <= set(words)
    assert {"tiny/base", "0.0213", "1.234", "2.9"} <= set(words)  # the final loss, not the average
    assert "1.9" not in words
    assert {"2.5", "(avg)"} <= set(words)
    assert {"sql/", "train.jsonl", "mistralai/", "Mistral-", "7B-", "Instruct-", "v0.2"} <= set(
        words
    )  # wrapped after / or -
    assert f"3 adapters in the folder {home}/" in " ".join(words)
    empty = " ".join(rendered(render_list(run_list(tmp_path / "none"))).split())
    assert empty.startswith(f"no adapters in the folder {tmp_path / 'none'}/ yet")


def test_table_widths_make_short_columns_whole_first():
    assert share_out(20, [(2, 4), (5, 30), (3, 3)]) == [4, 13, 3]
    assert share_out(9, [(2, 4), (5, 30)]) == [3, 6] or share_out(9, [(2, 4), (5, 30)]) == [4, 5]
    assert sum(share_out(40, [(2, 4), (5, 30), (1, 9)])) == 40


DOCTOR_CHECKS = ("python", "torch", "gpu", "bitsandbytes", "hub", "recipe", "disk")


def doctor_lines(out: str) -> dict[str, str]:
    """The verdict of each check by name (a detail's continuation lines start with spaces)."""
    return {line.split()[1]: line.split()[0] for line in out.splitlines() if line[:1].strip()}


def test_doctor_offline_prints_every_check_in_one_pass(tmp_path, monkeypatch, run_cli):
    """A hub that refuses connections is one line, and a recipe whose model config cannot be fetched is a
    warning among the other checks: no retries, no early stop."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    recipe = write_recipe(tmp_path, model={"id": "nobody/never-downloaded-model"})
    code, out, err = run_cli(["doctor", str(recipe)])
    verdicts = doctor_lines(out)
    assert code == 0, out + err
    assert set(DOCTOR_CHECKS) <= set(verdicts)
    assert (verdicts["hub"], verdicts["recipe"], verdicts["disk"]) == ("WARN", "OK", "WARN")
    assert out.count("unreachable") == 1 and "Retry" not in out + err
    assert "not in the local cache" in out


def test_doctor_exits_1_by_its_worst_check_and_still_prints_the_others(tmp_path, monkeypatch, run_cli):
    monkeypatch.setenv("COLUMNS", "80")
    (tmp_path / "not-a-model").mkdir()
    broken = write_recipe(tmp_path, model={"id": str(tmp_path / "not-a-model")}, lora={"r": "eight"})
    code, out, _ = run_cli(["doctor", str(broken)])
    verdicts = doctor_lines(out)
    assert code == 1 and set(DOCTOR_CHECKS) <= set(verdicts)
    assert (verdicts["recipe"], verdicts["disk"]) == ("FAIL", "WARN")
    assert "lora.r" in out and "not checked: the recipe does not load" in " ".join(out.split())
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80
