"""Mistakes caught before the work, and advice that never destroys: `validate` (and train before its weights)
checks data, columns, model and target modules; a copied recipe names its own adapter; a name collision names
the owner and a free name, and offers --force only for the recipe's own adapter."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY, write_jsonl, write_recipe

from qlora_cli import checkpoints, preflight
from qlora_cli.errors import ExitCode, QloraError
from qlora_cli.recipe import find_recipe, load_recipe

GOOD = {"instruction": "How many users?", "output": "SELECT COUNT(*) FROM users;"}


def folder_hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_copied_recipe_takes_its_names_from_its_own_file(tmp_path, run_cli):
    dest = tmp_path / "my-sql.yaml"
    code, out, _ = run_cli(["recipes", "copy", "tiny-sql", str(dest)])
    assert code == 0 and "its adapter: my-sql" in out
    text = dest.read_text()
    assert text.splitlines()[0] == f"# qlora train {dest}"
    assert "# purpose:" not in text, "the purpose line is written for the shipped list"
    written = yaml.safe_load(text)
    assert "name" not in written["lora"] and "output_dir" not in written["train"]
    recipe = load_recipe(dest)
    assert (recipe.lora.name, recipe.train.output_dir) == ("my-sql", "runs/my-sql")
    # Everything else is the shipped recipe's: the copy trains the same thing.
    shipped = load_recipe(REPO / "recipes" / "tiny-sql.yaml")
    assert recipe.model_dump(exclude={"lora": {"name"}, "train": {"output_dir"}}) == shipped.model_dump(
        exclude={"lora": {"name"}, "train": {"output_dir"}}
    )


def fake_adapter(home: Path, name: str, **record) -> Path:
    folder = home / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "qlora.json").write_text(json.dumps({"name": name, **record}))
    return folder


def test_collision_with_another_recipes_adapter_names_it_and_a_free_name_never_force(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = REPO / "recipes" / "tiny-sql.yaml"
    fake_adapter(tmp_path / "adapters", "sql", recipe_file=str(shipped))
    mine = write_recipe(tmp_path, "mine", lora={"name": "sql"})
    with pytest.raises(QloraError) as refused:
        preflight.check_adapter_free(
            Path("adapters/sql"), load_recipe(mine), mine, force=False, adapters_dir="adapters"
        )
    assert str(refused.value) == (
        f"adapter: adapters/sql already exists (made by recipe {shipped}); "
        "to keep it, give this one another name: --set lora.name=mine"
    )
    assert "--force" not in str(refused.value)
    # The same recipe file that made it may replace it, and the message says what that costs.
    with pytest.raises(
        QloraError, match=r"another name: --set lora.name=tiny-sql, or pass --force to delete the old adapter"
    ):
        preflight.check_adapter_free(
            Path("adapters/sql"), load_recipe(shipped), shipped, force=False, adapters_dir="adapters"
        )


def test_collision_without_a_recorded_recipe_names_what_the_adapter_records(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_adapter(
        tmp_path / "adapters",
        "sql",
        data={"path": "/data/train.jsonl"},
        base={"id": "tiny/base"},
        created="2026-01-02T03:04:05",
    )
    (tmp_path / "adapters" / "sql-2").mkdir()  # taken too: the next free name is offered
    mine = write_recipe(tmp_path, "sql")
    with pytest.raises(QloraError) as refused:
        preflight.check_adapter_free(
            Path("adapters/sql"), load_recipe(mine), mine, force=False, adapters_dir="adapters"
        )
    assert str(refused.value) == (
        "adapter: adapters/sql already exists (trained on /data/train.jsonl, base tiny/base, 2026-01-02 03:04); "
        "to keep it, give this one another name: --set lora.name=sql-3"
    )


def test_finished_run_folder_of_another_adapter_is_refused_with_a_free_folder(tmp_path):
    run_dir = tmp_path / "runs" / "sql"
    run_dir.mkdir(parents=True)
    (run_dir / "qlora.json").write_text(json.dumps({"kind": "run", "adapter": "sql"}))
    (run_dir / "recipe.yaml").write_text("{}")
    (run_dir / "metrics.json").write_text("{}")
    mine = write_recipe(tmp_path, "mine", lora={"name": "sql"}, train={"output_dir": str(run_dir)})
    with pytest.raises(QloraError) as refused:
        preflight.check_run_dir_free(run_dir, load_recipe(mine), mine, str(tmp_path / "adapters"))
    assert refused.value.exit_code == ExitCode.RUN_EXISTS
    assert str(refused.value) == (
        f"train.output_dir: {run_dir} already holds a finished run of adapter 'sql'; "
        f"to keep it, write this run elsewhere: --set train.output_dir={tmp_path / 'runs' / 'mine'}"
    )
    # Stopped before its first checkpoint (no metrics, no checkpoint): not finished; this adapter's own run
    # may start over, since nothing in it can be resumed.
    (run_dir / "metrics.json").unlink()
    with pytest.raises(QloraError) as refused:
        preflight.check_run_dir_free(run_dir, load_recipe(mine), mine, str(tmp_path / "adapters"))
    assert str(refused.value) == (
        f"train.output_dir: {run_dir} already holds a run of adapter 'sql' that stopped before its first "
        f"checkpoint; to keep it, write this run elsewhere: --set train.output_dir={tmp_path / 'runs' / 'mine'}, "
        "or pass --force to start it over (its logs are deleted)"
    )


def test_a_run_folders_recipe_stands_for_the_file_the_run_started_from(tmp_path):
    recipe_file = write_recipe(tmp_path, "mine")
    run_dir = tmp_path / "runs" / "mine"
    run_dir.mkdir(parents=True)
    checkpoints.RunMarker(adapter="mine", recipe_file=str(recipe_file)).write(run_dir)
    (run_dir / checkpoints.RECIPE).write_text(load_recipe(recipe_file).to_yaml())
    # `qlora train runs/mine --resume` finds the run's recipe; the adapter will name the user's file.
    found = find_recipe(run_dir)
    assert found == run_dir / checkpoints.RECIPE
    assert checkpoints.original_recipe(found) == recipe_file
    assert checkpoints.original_recipe(recipe_file) == recipe_file


@pytest.mark.pipeline
def test_copied_recipe_trains_beside_the_demo_adapter_without_touching_it(
    tmp_path, monkeypatch, run_cli, trained_adapters
):
    home = tmp_path / "adapters"
    shutil.copytree(trained_adapters / "sql", home / "sql")
    before = folder_hashes(home / "sql")
    monkeypatch.chdir(tmp_path)
    assert run_cli(["recipes", "copy", "tiny-sql", "my.yaml"])[0] == 0
    small = ["--set", "train.max_steps=1", "--set", "data.max_rows=16", "--set", "data.eval_path=null"]
    small += ["--set", "train.eval_steps=null"]  # the demo's periodic eval needs the held-out rows
    code, _, err = run_cli(["train", "my.yaml", *small, "--adapters-dir", str(home)])
    assert code == 0, err
    assert sorted(path.name for path in home.iterdir()) == ["my", "sql"]
    assert json.loads((home / "my" / "qlora.json").read_text())["name"] == "my"
    assert (tmp_path / "runs" / "my" / "metrics.json").is_file()
    assert folder_hashes(home / "sql") == before
    # Training it again is this recipe's own adapter: a free name, or --force with what it deletes.
    code, _, err = run_cli(["train", "my.yaml", *small, "--adapters-dir", str(home)])
    assert code == ExitCode.USER_ERROR
    assert "--set lora.name=my-2, or pass --force to delete the old adapter" in err
    # The copy named like the demo: the demo's adapter is named as another recipe's, and --force is not offered.
    code, _, err = run_cli(["train", "my.yaml", *small, "--set", "lora.name=sql", "--adapters-dir", str(home)])
    assert code == ExitCode.USER_ERROR and "adapters/sql already exists (made by recipe" in err
    assert "--force" not in err
    assert folder_hashes(home / "sql") == before


def validate(run_cli, recipe: Path) -> tuple[int, str, str]:
    return run_cli(["validate", str(recipe), "--adapters-dir", str(recipe.parent / "adapters")])


def test_validate_prints_what_it_checked(tmp_path, run_cli):
    code, out, err = validate(run_cli, write_recipe(tmp_path))
    assert code == 0, err
    assert out.splitlines() == [
        f"{tmp_path / 'tiny.yaml'}: OK",
        f"  data: {TINY / 'sql' / 'train.jsonl'}: 1500 of 1500 alpaca rows can train; columns instruction, input, output",
        f"  eval data: {TINY / 'sql' / 'test.jsonl'}: 100 of 100 alpaca rows can train; columns instruction, input, output",
        "  template: alpaca; loss on each assistant turn",
        f"  model: local folder {TINY / 'base'} (MistralForCausalLM)",
        "  targets: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (28 linear layers match)",
        f"  adapter: tiny -> {tmp_path / 'adapters' / 'tiny'}; run folder {tmp_path / 'runs' / 'tiny'}",
    ]


def test_validate_catches_a_bad_column_mapping_with_did_you_mean_and_the_columns(tmp_path, run_cli):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "How many?", "context": "t", "answer": "SELECT 1;"}])
    recipe = write_recipe(
        tmp_path,
        data={"path": str(data), "eval_path": None, "columns": {"instruction": "questoin", "output": "answer"}},
    )
    code, out, err = validate(run_cli, recipe)
    assert code == ExitCode.USER_ERROR and out == ""
    assert err == (
        f"error: {recipe}: 1 problem(s)\n"
        f"  data.columns.instruction: {data} has no column 'questoin'; did you mean 'question'? "
        "(its columns: question, context, answer)\n"
    )
    # Without any mapping the usual column is suggested, ready to paste.
    unmapped = write_recipe(tmp_path, "unmapped", data={"path": str(data), "eval_path": None})
    code, _, err = validate(run_cli, unmapped)
    assert code == ExitCode.USER_ERROR
    assert (
        "has no 'instruction' column (its columns: question, context, answer); name the column that holds it: "
        "--set data.columns.instruction=question" in err
    )
    assert "--set data.columns.output=answer" in err


def test_validate_reports_every_bad_row_together_or_counts_those_drop_would_skip(tmp_path, run_cli):
    rows = [GOOD, {"instruction": "a"}, GOOD, *[{"instruction": "", "output": "b"}] * 6, GOOD]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    recipe = write_recipe(tmp_path, data={"path": str(data), "eval_path": None})
    code, _, err = validate(run_cli, recipe)
    assert code == ExitCode.USER_ERROR
    assert err.splitlines()[1:] == [
        f"  {data}: 7 of 10 rows cannot train; fix them, or set data.invalid_rows: drop to skip such rows:",
        "      row 2: missing or empty field(s) output (alpaca rows need instruction and output)",
        *[
            f"      row {n}: missing or empty field(s) instruction (alpaca rows need instruction and output)"
            for n in (4, 5, 6, 7)
        ],
        "      ... and 2 more",
    ]
    dropping = write_recipe(tmp_path, "dropping", data={"path": str(data), "eval_path": None, "invalid_rows": "drop"})
    code, out, err = validate(run_cli, dropping)
    assert code == 0, err
    assert f"  data: {data}: 3 of 10 alpaca rows can train; 7 would be dropped (data.invalid_rows: drop)" in out


def test_validate_names_a_missing_file_and_an_unsupported_one(tmp_path, run_cli):
    missing = write_recipe(tmp_path, "missing", data={"path": "nope.jsonl", "eval_path": "held-out.txt"})
    code, _, err = validate(run_cli, missing)
    assert code == ExitCode.USER_ERROR
    # held-out.txt is a file name, not a hub dataset: it is missing too.
    assert err == (
        f"error: {missing}: 2 problem(s)\n"
        "  data.path: file not found: nope.jsonl\n  data.eval_path: file not found: held-out.txt\n"
    )
    (tmp_path / "rows.txt").write_text("How many? -> SELECT 1;\n")
    unsupported = write_recipe(tmp_path, "unsupported", data={"path": "rows.txt", "eval_path": None})
    code, _, err = validate(run_cli, unsupported)
    assert code == ExitCode.USER_ERROR
    assert (
        f"data.path: {tmp_path / 'rows.txt'}: unsupported file type '.txt'; use .jsonl, .json, .csv or .parquet" in err
    )


def test_validate_refuses_target_modules_that_match_nothing(tmp_path, run_cli):
    recipe = write_recipe(tmp_path, lora={"name": "tiny", "target_modules": ["q_proj", "self_attn.v_proj", "qkv"]})
    code, _, err = validate(run_cli, recipe)
    assert code == ExitCode.USER_ERROR
    assert (
        "lora.target_modules: 'qkv' matches no linear layer of this model, so the adapter would train less than "
        "listed; its linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in err
    )
    fine = write_recipe(tmp_path, "fine", lora={"name": "fine", "target_modules": ["q_proj", "self_attn.v_proj"]})
    code, out, err = validate(run_cli, fine)
    assert code == 0, err
    assert "  targets: q_proj, v_proj (8 linear layers match)" in out  # 4 layers x 2


def test_validate_tells_a_hub_id_from_a_local_folder(tmp_path, run_cli):
    hub = write_recipe(tmp_path, "hub", model={"id": "some-org/some-model"})
    code, out, err = validate(run_cli, hub)
    assert code == 0, err
    assert "  model: hub id some-org/some-model; not checked offline (train --dry-run fetches its config)" in out
    assert "  targets: all-linear: not checked without the model's config" in out
    (tmp_path / "weights-only").mkdir()
    local = write_recipe(tmp_path, "local", model={"id": str(tmp_path / "weights-only")})
    code, _, err = validate(run_cli, local)
    assert code == ExitCode.USER_ERROR
    assert f"model.id: {tmp_path / 'weights-only'} has no config.json; is it a transformers model folder?" in err


def test_validate_refuses_an_eval_file_that_dpo_cannot_evaluate(tmp_path, run_cli):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    recipe = write_recipe(
        tmp_path,
        "pairs",
        data={"path": str(pairs), "eval_path": str(TINY / "sql" / "test.jsonl")},
        train={"method": "dpo"},
    )
    code, _, err = validate(run_cli, recipe)
    assert code == ExitCode.USER_ERROR
    assert "train.method: dpo learns from preference rows" in " ".join(err.split())
    assert f"{TINY / 'sql' / 'test.jsonl'} holds alpaca rows" in " ".join(err.split())
