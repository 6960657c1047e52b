"""Preference tuning: DPO continuing a named adapter on the shipped tiny base, the data it reads, the
refusals before any weights load, and eval's side-by-side preference accuracy."""

import json
import shutil

import pytest
from helpers import TINY, assert_resumed_as_straight, stopped_by_sigterm, write_jsonl, write_recipe

from qlora_cli.data import check_data
from qlora_cli.errors import ExitCode, QloraError

pytestmark = pytest.mark.pipeline
PAIRS = TINY / "sql" / "preferences.jsonl"
QUICK = {"max_steps": 2, "logging_steps": 1, "save_steps": 2, "batch_size": 4, "grad_accum": 1}


def dpo_recipe(
    tmp_path, name: str = "sql-dpo", *, lora: dict | None = None, data: dict | None = None, train: dict | None = None
):
    return write_recipe(
        tmp_path,
        name,
        lora={"init_from": "sql", **(lora or {})},
        data={"path": str(PAIRS), "eval_path": None, "max_rows": 16, **(data or {})},
        train={**QUICK, "method": "dpo", "lr": 1.0e-3, **(train or {})},
    )


@pytest.fixture(scope="module")
def parent(tmp_path_factory, trained_adapters):
    """A home holding the session's trained sql adapter, for DPO and ORPO to continue."""
    folder = tmp_path_factory.mktemp("preference")
    shutil.copytree(trained_adapters / "sql", folder / "adapters" / "sql")
    return folder


def test_the_shipped_pairs_are_the_sql_rows_turned_around():
    from tools import world

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (TINY / "sql" / f"{name}.jsonl").read_text().splitlines()]

    assert rows("preferences") == world.sql_preference_rows(rows("train")) and len(rows("preferences")) > 500
    # eval's held-out pairs: the test questions, turned around the same way
    assert rows("test-preferences") == world.sql_preference_rows(rows("test")) and len(rows("test-preferences")) > 40
    assert world.flipped_query("SELECT name FROM pets ORDER BY age DESC LIMIT 1;").endswith("age ASC LIMIT 1;")


def test_bad_preference_rows_are_named(tmp_path):
    from qlora_cli.data import RowFile

    rows = [
        {"prompt": "q1", "chosen": "a", "rejected": "b"},
        {"prompt": "q2", "chosen": "a"},
        {"prompt": "q3", "chosen": "same", "rejected": "same"},
        {"chosen": "a", "rejected": "b"},
        {"prompt": "q5", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"},  # kept: a list and a text
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(QloraError) as refused:
        check_data(RowFile(str(path), format="preference"))
    message = str(refused.value)
    assert "3 of 5 rows" in message
    assert "row 2: missing or empty field rejected" in message
    assert "row 3: chosen and rejected are the same answer" in message
    assert "row 4: no prompt, and chosen and rejected share no beginning that ends in whitespace" in message


def test_an_implicit_prompt_is_the_beginning_chosen_and_rejected_share(tmp_path):
    from qlora_cli.data import RowFile, normalized, preference_problem

    user = {"role": "user", "content": "q"}
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "a"}],
            "rejected": [user, {"role": "assistant", "content": "b"}],
        },
        {"chosen": "Human: hi\n\nAssistant: Sure thing", "rejected": "Human: hi\n\nAssistant: Surely not"},
    ]
    conversation, text = (
        check_data(RowFile(str(write_jsonl(tmp_path / f"{name}.jsonl", [row])), format="preference")).rows[0]
        for name, row in zip(("conversation", "text"), rows)
    )
    assert conversation == {"messages": [user], "chosen": "a", "rejected": "b"}
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    with_tools = {**rows[0], "tools": [tool], "system": "Be brief."}
    assert normalized(with_tools, "preference") == {
        "messages": [{"role": "system", "content": "Be brief."}, user],
        "tools": [tool],
        "chosen": "a",
        "rejected": "b",
    }
    assert "share no beginning that ends in whitespace" in preference_problem({"chosen": "A:yes", "rejected": "A:no"})
    # Cut at the last whitespace both share: "Sure" and "Surely" are whole answers, not "e thing" and "ely not".
    assert text == {"prompt": "Human: hi\n\nAssistant: ", "chosen": "Sure thing", "rejected": "Surely not"}


def test_a_file_asks_every_question_one_way_and_an_implicit_prompt_must_be_shared(tmp_path):
    from qlora_cli.data import RowFile

    def turn(role, content):
        return {"role": role, "content": content}

    rows = [
        {"prompt": [turn("user", "q1")], "chosen": "a", "rejected": "b"},  # the odd one first: most rows decide
        {"prompt": "q2", "chosen": "a", "rejected": "b"},
        {"prompt": "q5", "instruction": "", "chosen": "a", "rejected": "b"},  # a blank instruction asks nothing
        {
            "chosen": [turn("user", "q3"), turn("assistant", "a")],
            "rejected": [turn("user", "q4"), turn("assistant", "b")],
        },
    ]
    with pytest.raises(QloraError) as refused:
        check_data(RowFile(str(write_jsonl(tmp_path / "mixed.jsonl", rows)), format="preference"))
    message = str(refused.value)
    assert "2 of 4 rows" in message
    assert "row 1: asks its question as messages, while most rows (2 of 3) ask as a text prompt" in message
    assert "row 4: no prompt, and chosen and rejected differ before their last message" in message


@pytest.mark.parametrize(
    "conversation",
    [
        {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ],
    ids=["preference pair", "conversation"],
)
def test_eval_names_a_row_the_template_cannot_render_before_the_weights_load(
    conversation, tmp_path, run_cli, monkeypatch
):
    from qlora_cli import generate

    def loading(*args, **kwargs):
        raise AssertionError("the weights began to load")

    monkeypatch.setattr(generate, "load_model", loading)
    rows = write_jsonl(tmp_path / "rows.jsonl", [conversation])
    code, _, err = run_cli(["eval", "--data", str(rows), "-a", "none", "--base", str(TINY / "base")])
    assert code == 1 and "row 1, rendered for none: the alpaca template renders one prompt" in err, err


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


def test_a_parent_that_is_the_adapter_being_written_is_refused_even_with_force(parent, run_cli, tmp_path):
    home = tmp_path / "adapters"
    shutil.copytree(parent / "adapters" / "sql", home / "sql")
    before = (home / "sql" / "adapter_model.safetensors").read_bytes()
    code, _, err = run_cli(["train", str(dpo_recipe(tmp_path, "sql")), "--force", "--adapters-dir", str(home)])
    assert code == 1 and "lora.init_from: sql is the adapter this recipe writes" in err, err
    assert (home / "sql" / "adapter_model.safetensors").read_bytes() == before
    assert not (tmp_path / "runs" / "sql").exists()


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


def test_a_dpo_run_stopped_by_sigterm_resumes_to_the_uninterrupted_adapter(parent, run_cli, tmp_path):
    """The parent's weights are loaded again on resume and TRL's reference is built from them, not from the
    checkpoint; the checkpoint then restores the trained adapter, its optimizer (LoRA+'s groups) and the data
    order."""
    home = parent / "adapters"
    steps = {"max_steps": 4, "save_steps": 2, "lr": 2.0e-4}
    recipes = {
        name: dpo_recipe(tmp_path, name, lora={"lora_plus_ratio": 4}, data={"max_rows": 32}, train=steps)
        for name in ("dpo-straight", "dpo-resumed")
    }
    code, _, err = run_cli(["train", str(recipes["dpo-straight"]), "--adapters-dir", str(home)])
    assert code == 0, err[-3000:]
    run_dir = stopped_by_sigterm(recipes["dpo-resumed"], home)
    assert not (home / "dpo-resumed").exists()
    code, _, err = run_cli(["train", str(run_dir), "--resume", "--adapters-dir", str(home)])
    assert code == 0, err[-3000:]
    assert_resumed_as_straight(tmp_path / "runs" / "dpo-straight", run_dir, home, tolerance=1e-5)
    record = json.loads((home / "dpo-resumed" / "qlora.json").read_text())
    assert (record["method"], record["parent"]) == ("dpo", "sql")


def test_a_diverging_dpo_run_stops_and_exports_nothing(parent, run_cli, tmp_path):
    home = parent / "adapters"
    recipe = dpo_recipe(tmp_path, "dpo-nan", train={"lr": 1.0e30, "warmup_ratio": 0.0, "save_steps": 1})
    code, _, err = run_cli(["train", str(recipe), "--adapters-dir", str(home)])
    assert code == ExitCode.DIVERGED and "loss became" in err and "last good checkpoint" in err, err[-3000:]
    assert not (home / "dpo-nan").exists()


def test_dpo_from_scratch_on_conversations_with_an_implicit_prompt_trains_in_the_chat_template(tmp_path, run_cli):
    """No parent: the reference is the base (the new adapter's update starts at zero). The rows are TRL's
    implicit-prompt conversations, rendered with the tiny base's own chat template."""

    def turn(role, content):
        return {"role": role, "content": content}

    rows = [
        {
            "chosen": [turn("user", f"Which pet is oldest, {i}?"), turn("assistant", "ORDER BY age DESC")],
            "rejected": [turn("user", f"Which pet is oldest, {i}?"), turn("assistant", "ORDER BY age ASC")],
        }
        for i in range(8)
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    recipe = write_recipe(
        tmp_path,
        "chat-dpo",
        data={"path": str(pairs), "eval_path": None, "template": "chat"},
        train={**QUICK, "method": "dpo"},
    )
    home = tmp_path / "adapters"
    code, _, err = run_cli(["train", str(recipe), "--adapters-dir", str(home)])
    assert code == 0, err[-3000:]
    record = json.loads((home / "chat-dpo" / "qlora.json").read_text())
    assert (record["method"], record["parent"], record["template"]) == ("dpo", None, "chat")
    code, out, err = run_cli(
        ["eval", "--data", str(pairs), "-a", "none", "-a", "chat-dpo", "--adapters-dir", str(home)]
    )
    assert code == 0 and "chat-dpo" in out, err[-3000:]
