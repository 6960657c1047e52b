"""Eval you can act on: every row in --out, a few misses under a table that fits 80 columns, data read the way
the adapter was trained and checked before any weights load; --out paths checked before any work."""

import io
import json

import pytest
from helpers import TINY, write_jsonl
from rich.console import Console

from qlora_cli.adapters import AdapterRecord, DataRecord
from qlora_cli.errors import QloraError
from qlora_cli.evaluate import MIX, Evaluation, Score, ScoredRow, held_out_rows, render
from qlora_cli.files import prepare_output_file

SCHEMA = "table movies (title, director, genre, rating, minutes)"
REFERENCE = "SELECT director, COUNT(*) FROM movies GROUP BY director;"


def scored(adapter: str, missed: set[int], examples: int = 20) -> Score:
    rows = tuple(
        ScoredRow(
            row=number,
            instruction=f"How many movies are there for each director, question {number}?",
            input=SCHEMA,
            reference=REFERENCE,
            prediction="SELECT director FROM movies;" if number in missed else REFERENCE,
            exact_match=number not in missed,
            execution_match=number not in missed,
        )
        for number in range(1, examples + 1)
    )
    share = 1 - len(missed) / examples
    return Score(adapter, examples, 0.1234, 1.13, share, share, rows)


def printed_at_80(evaluation: Evaluation) -> list[str]:
    console = Console(width=80, file=io.StringIO(), color_system=None)
    console.print(render(evaluation))
    return console.file.getvalue().splitlines()


def test_the_table_and_a_few_misses_fit_80_columns():
    evaluation = Evaluation(
        data="recipes/tiny/sql/test.jsonl",
        base_id="recipes/tiny/base",
        mix="sql=0.5,json=0.5",
        sql=True,
        scores=(scored("none", set(range(1, 21))), scored("sql", {4, 9}), scored("json", set()), scored(MIX, {2})),
    )
    lines = printed_at_80(evaluation)
    assert max(map(len, lines)) <= 80
    table = [line for line in lines if line.startswith("│")]
    # One line per adapter, every cell whole: the mix's label and the percentages are not wrapped or cut.
    assert [line.split("│")[1].strip() for line in table] == ["none", "sql", "json", "mix sql=0.5,json=0.5"]
    assert all("…" not in line for line in table)
    assert all(line.split("│")[-3].strip() == "0.0%" for line in table[:1])
    # Under the table: at most three misses per adapter, the rows that really missed, each with want and got.
    text = "\n".join(lines)
    assert "none missed 20 of 20, the first 3:" in text and "sql missed 2 of 20, all shown:" in text
    assert lines[-1] == "--out FILE writes every row"
    assert "json missed" not in text
    shown = [line.split(":")[0].strip() for line in lines if line.startswith("  row ")]
    assert shown == ["row 1", "row 2", "row 3", "row 4", "row 9", "row 2"]
    assert sum(line.startswith("    want " + REFERENCE) for line in lines) == 6
    assert sum(line == "    got  SELECT director FROM movies;" for line in lines) == 6


def test_a_long_row_is_cut_to_80_columns_with_an_ellipsis():
    long_row = ScoredRow(1, "Which " + "very " * 30 + "long question?", SCHEMA, REFERENCE, "x" * 200, False)
    evaluation = Evaluation("held-out.jsonl", "base", None, False, (Score("sql", 1, 1.0, 2.7, 0.0, None, (long_row,)),))
    lines = printed_at_80(evaluation)
    assert max(map(len, lines)) <= 80
    assert any(line.startswith("  row 1: Which very") and line.endswith("…") for line in lines)
    assert any(line.startswith("    got  xxx") and line.endswith("…") for line in lines)


def test_rows_are_written_beside_the_totals():
    score = scored("sql", {2}, examples=3)
    written = score.as_dict()
    # The totals stay where scripts read them; every row follows.
    assert {key: written[key] for key in ("adapter", "examples", "loss", "exact_match", "execution_match")} == {
        "adapter": "sql",
        "examples": 3,
        "loss": 0.1234,
        "exact_match": pytest.approx(2 / 3),
        "execution_match": pytest.approx(2 / 3),
    }
    assert written["rows"][1] == {
        "row": 2,
        "instruction": "How many movies are there for each director, question 2?",
        "input": SCHEMA,
        "reference": REFERENCE,
        "prediction": "SELECT director FROM movies;",
        "exact_match": False,
        "execution_match": False,
    }


def adapter_record(folder, *, columns=None, recipe_columns=None) -> AdapterRecord:
    """A trained adapter's record as eval reads it: data.columns in qlora.json, or only in its recipe.yaml."""
    folder.mkdir(parents=True)
    if recipe_columns is not None:
        (folder / "recipe.yaml").write_text(json.dumps({"data": {"columns": recipe_columns}}))
    return AdapterRecord(folder=folder, name=folder.name, data=DataRecord(columns=columns or {}))


def test_eval_reads_the_data_with_the_columns_each_adapter_was_trained_on(tmp_path):
    data = write_jsonl(
        tmp_path / "held-out.jsonl",
        [{"question": "How many movies?", "schema": SCHEMA, "sql": "SELECT COUNT(*) FROM movies;"}],
    )
    mapping = {"instruction": "question", "input": "schema", "output": "sql"}
    records = {
        "recorded": adapter_record(tmp_path / "recorded", columns=mapping),
        "older": adapter_record(tmp_path / "older", recipe_columns=mapping),  # qlora.json before data.columns
    }
    rows = held_out_rows(str(data), ["none", "recorded", "older"], records)
    for name in ("none", "recorded", "older"):  # the base reads the file as the first adapter does
        assert (
            rows[name][0].items()
            >= {
                "instruction": "How many movies?",
                "input": SCHEMA,
                "output": "SELECT COUNT(*) FROM movies;",
            }.items()
        )


def test_data_that_does_not_fit_the_adapters_columns_fails_naming_them(tmp_path):
    data = write_jsonl(tmp_path / "held-out.jsonl", [{"question": "How many movies?", "query": "SELECT 1;"}] * 3)
    records = {"sql": adapter_record(tmp_path / "sql", columns={"instruction": "question", "output": "sql"})}
    with pytest.raises(QloraError) as raised:
        held_out_rows(str(data), ["sql"], records)
    message = str(raised.value)
    assert "'sql'" in message and "query" in message  # the missing column, and what the file has
    assert "as adapter 'sql' was trained" in message


def test_eval_checks_every_row_and_lists_the_bad_ones(tmp_path):
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q"}, {"instruction": "", "output": "a"}]
    data = write_jsonl(tmp_path / "held-out.jsonl", rows)
    with pytest.raises(
        QloraError, match=r"2 of 3 rows cannot be scored; fix them or remove them:\n    row 2: .*\n    row 3"
    ):
        held_out_rows(str(data), ["none"], {})


def test_an_out_file_gets_its_folders_and_a_folder_is_refused(tmp_path):
    out = tmp_path / "results" / "june" / "eval.json"
    prepare_output_file(out, "--out", "eval.json")
    assert out.parent.is_dir() and not out.exists()
    with pytest.raises(
        QloraError, match=r"--out .*results: is a folder; name a file inside it, e.g. --out .*eval.json"
    ):
        prepare_output_file(tmp_path / "results", "--out", "eval.json")
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(QloraError, match=r"notes is a file, not a folder"):
        prepare_output_file(tmp_path / "notes" / "eval.json", "--out", "eval.json")
    assert (tmp_path / "notes").read_text() == "mine"


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_bad_out_path_fails_before_any_model_loads(command, tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").mkdir()
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"instruction": "List all users."}])
    source = {"eval": ["--data", str(TINY / "sql" / "test.jsonl")], "generate": ["--prompts", str(prompts)]}[command]
    code, _, err = run_cli([command, *source, "-a", "none", "--base", str(TINY / "base"), "--out", "taken"])
    assert code == 1 and "--out taken: is a folder" in err and "Traceback" not in err


def test_a_prompt_row_that_has_an_answer_field_fails_naming_its_line(tmp_path, run_cli):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "List all users."}\n\n{"instruction": "Count them.", "answer": "2"}\n')
    code, _, err = run_cli(["generate", "-a", "none", "--base", str(TINY / "base"), "--prompts", str(prompts)])
    assert code == 1 and "Traceback" not in err
    assert f'{prompts}: line 3: the row already has an "answer" field' in err


def test_unknown_words_are_named_on_a_word_level_tokenizer(real_tokenizer):
    from transformers import AutoTokenizer

    from qlora_cli.generate import unknown_words

    tiny = AutoTokenizer.from_pretrained(TINY / "base")
    text = "How many Zorblax have a genre of poetry? List the Zorblax and Quuxes."
    assert unknown_words(tiny, text) == ["Zorblax", "Quuxes"]
    # The vocabulary holds the demo's words as written and with a capital: 'poetry', 'Poetry', not 'POETRY'.
    assert unknown_words(tiny, "How many books have a genre of POETRY?") == ["POETRY"]
    assert unknown_words(tiny, "How many books have a genre of poetry?") == []
    assert unknown_words(real_tokenizer, text) == []  # byte fallback and byte-level BPE represent every word


def test_chat_leaves_on_an_empty_line_end_of_input_and_ctrl_c():
    from qlora_cli.generate import chat_instructions

    def typed(*lines):
        pending = list(lines)

        def read(prompt):
            assert prompt == "you: "
            item = pending.pop(0)
            if isinstance(item, BaseException):
                raise item
            return item

        return read

    assert list(chat_instructions(typed("first", "second", ""))) == ["first", "second"]
    assert list(chat_instructions(typed("first", EOFError()))) == ["first"]
    assert list(chat_instructions(typed(KeyboardInterrupt()))) == []


def test_missing_prompts_file_is_named(tmp_path, run_cli):
    code, _, err = run_cli(["generate", "-a", "none", "--prompts", str(tmp_path / "nope.jsonl")])
    assert code == 1 and "--prompts" in err and "nope.jsonl: no such file" in err and "Traceback" not in err
