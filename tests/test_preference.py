"""Preference tuning: DPO continuing a named adapter on the shipped tiny base, the data it reads, the
refusals before any weights load, and eval's side-by-side preference accuracy."""

import json
import shutil

import pytest
from helpers import TINY, write_recipe

from qlora_cli.data import check_data
from qlora_cli.errors import QloraError

pytestmark = pytest.mark.pipeline
PAIRS = TINY / "sql" / "preferences.jsonl"
QUICK = {"max_steps": 2, "logging_steps": 1, "save_steps": 2, "batch_size": 4, "grad_accum": 1}


def dpo_recipe(tmp_path, name: str = "sql-dpo", *, lora: dict | None = None, data: dict | None = None):
    return write_recipe(
        tmp_path,
        name,
        lora={"init_from": "sql", **(lora or {})},
        data={"path": str(PAIRS), "eval_path": None, "max_rows": 16, **(data or {})},
        train={**QUICK, "method": "dpo", "lr": 1.0e-3},
    )


@pytest.fixture(scope="module")
def parent(tmp_path_factory, trained_adapters):
    """A home holding the session's trained sql adapter, for DPO and ORPO to continue."""
    folder = tmp_path_factory.mktemp("preference")
    shutil.copytree(trained_adapters / "sql", folder / "adapters" / "sql")
    return folder


def test_the_shipped_pairs_are_the_sql_training_rows_turned_around():
    from tools import world

    train = [json.loads(line) for line in (TINY / "sql" / "train.jsonl").read_text().splitlines()]
    shipped = [json.loads(line) for line in PAIRS.read_text().splitlines()]
    assert shipped == world.sql_preference_rows(train) and len(shipped) > 500
    assert world.flipped_query("SELECT name FROM pets ORDER BY age DESC LIMIT 1;").endswith("age ASC LIMIT 1;")


def test_bad_preference_rows_are_named(tmp_path):
    from qlora_cli.data import RowFile

    rows = [
        {"prompt": "q1", "chosen": "a", "rejected": "b"},
        {"prompt": "q2", "chosen": "a"},
        {"prompt": "q3", "chosen": "same", "rejected": "same"},
        {"chosen": "a", "rejected": "b"},
        {
            "prompt": [{"role": "user", "content": "q5"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": "b",
        },
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(QloraError) as refused:
        check_data(RowFile(str(path), format="preference"))
    message = str(refused.value)
    assert "3 of 5 rows" in message
    assert "row 2: missing or empty field rejected" in message
    assert "row 3: chosen and rejected are the same answer" in message
    assert "row 4: missing or empty field prompt" in message


def test_dpo_continues_the_named_adapter_and_records_its_parent(parent, run_cli, tmp_path):
    home = parent / "adapters"
    code, out, err = run_cli(["train", str(dpo_recipe(tmp_path)), "--adapters-dir", str(home)])
    assert code == 0, err[-3000:]
    adapter = home / "sql-dpo"
    record = json.loads((adapter / "qlora.json").read_text())
    assert (record["method"], record["parent"], record["template"]) == ("dpo", "sql", "alpaca")
    # Only the trained adapter is exported, not TRL's frozen reference copy.
    assert not (adapter / "ref").exists() and (adapter / "adapter_model.safetensors").is_file()
    code, out, _ = run_cli(["adapters", "list", "--adapters-dir", str(home)])
    assert code == 0 and "← sql (dpo)" in out

    # Eval on preference pairs: each adapter's chosen-over-rejected accuracy and margin, side by side.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:8]))
    report = tmp_path / "eval.json"
    code, out, err = run_cli(
        [
            "eval",
            "--data",
            str(pairs),
            "-a",
            "none",
            "-a",
            "sql",
            "-a",
            "sql-dpo",
            "--adapters-dir",
            str(home),
            "--out",
            str(report),
        ]
    )
    assert code == 0, err[-3000:]
    assert "chosen" in out and "margin" in out
    results = {entry["adapter"]: entry for entry in json.loads(report.read_text())["results"]}
    assert set(results) == {"none", "sql", "sql-dpo"}
    assert all(entry["pairs"] == 8 and len(entry["margins"]) == 8 for entry in results.values())
    assert results["sql"]["margins"] != results["sql-dpo"]["margins"]


@pytest.mark.parametrize(
    ("lora", "data", "expected"),
    [
        ({"r": 8}, {}, "lora.init_from: sql was trained with rank 16 (lora.r is 8)"),
        ({"target_modules": ["q_proj"]}, {}, "target modules"),
        ({"init_from": "nowhere"}, {}, "nowhere"),
        ({}, {"path": str(TINY / "sql" / "test.jsonl")}, "train.method: dpo learns from preference rows"),
    ],
)
def test_a_parent_or_data_that_does_not_fit_is_refused_before_loading(parent, run_cli, tmp_path, lora, data, expected):
    home = parent / "adapters"
    code, _, err = run_cli(
        ["train", str(dpo_recipe(tmp_path, "bad", lora=lora, data=data)), "--adapters-dir", str(home)]
    )
    assert code == 1 and expected in err, err
    assert not (home / "bad").exists() and not (tmp_path / "runs" / "bad").exists()


def test_a_parent_trained_on_another_base_is_refused(parent, run_cli, tmp_path):
    home = tmp_path / "adapters"
    shutil.copytree(parent / "adapters" / "sql", home / "sql")
    record = json.loads((home / "sql" / "qlora.json").read_text())
    record["base"]["fingerprint"] = "sha256:" + "0" * 32
    (home / "sql" / "qlora.json").write_text(json.dumps(record))
    code, _, err = run_cli(["train", str(dpo_recipe(tmp_path)), "--adapters-dir", str(home)])
    assert code == 1 and "has other weights" in err, err
    assert not (home / "sql-dpo").exists()


def test_orpo_trains_from_the_named_adapter_with_no_reference(parent, run_cli, tmp_path):
    home = parent / "adapters"
    recipe = write_recipe(
        tmp_path,
        "sql-orpo",
        lora={"init_from": "sql"},
        data={"path": str(PAIRS), "eval_path": None, "max_rows": 16},
        train={**QUICK, "method": "orpo"},
    )
    code, out, err = run_cli(["train", str(recipe), "--adapters-dir", str(home)])
    assert code == 0, err[-3000:]
    record = json.loads((home / "sql-orpo" / "qlora.json").read_text())
    assert (record["method"], record["parent"]) == ("orpo", "sql")
    assert record["metrics"]["tokens_seen"] > 0 and record["metrics"]["tokens_per_second"] > 0
