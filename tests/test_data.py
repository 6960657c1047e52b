import json

import pytest
from helpers import write_jsonl, write_recipe
from transformers import AutoTokenizer

from qlora_cli.data import IGNORE_INDEX, RowFile, build_dataset, check_data, hold_out, read_rows, tokenize_example
from qlora_cli.errors import QloraError
from qlora_cli.model import load_tokenizer, resolve_model_dir
from qlora_cli.prompts import render_example
from qlora_cli.recipe import DataSection, TrainSection, load_recipe


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.pad_token = tok.eos_token  # the classic trap: pad = EOS must not stop EOS from being learned
    return tok


def test_prompt_tokens_carry_no_loss(tokenizer):
    example = tokenize_example("### Response:\n", "SELECT 1;", tokenizer, 256)
    prompt_length = len(tokenizer("### Response:\n")["input_ids"])
    assert example["labels"][:prompt_length] == [IGNORE_INDEX] * prompt_length
    assert all(label != IGNORE_INDEX for label in example["labels"][prompt_length:])


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(QloraError, match=r"d.jsonl: line 2: malformed JSON"):
        read_rows(str(path))


def test_non_utf8_names_the_byte_offset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(QloraError, match="byte 0xe9 at byte offset 20"):
        read_rows(str(path))


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n")
    with pytest.raises(QloraError, match="has no rows"):
        read_rows(str(path))


def test_missing_field_names_the_row(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "c"}, {"instruction": "a"}]
    with pytest.raises(QloraError, match="row 3: missing or empty field"):
        check_data(RowFile(str(write_jsonl(tmp_path / "d.jsonl", rows))))


def test_other_file_formats_read_the_same_rows(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "x", "output": "d"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("instruction,input,output\na,,b\nc,x,d\n")
    assert read_rows(str(tmp_path / "d.json")) == rows
    csv_rows = read_rows(str(tmp_path / "d.csv"))
    assert [(r["instruction"], r["output"]) for r in csv_rows] == [("a", "b"), ("c", "d")]


def test_responses_cut_off_by_max_length_are_counted_then_dropped_or_fatal(tmp_path, tokenizer):
    long_instruction = " ".join(["word"] * 80)
    rows = [{"instruction": "short", "output": "SELECT 1;"}, {"instruction": long_instruction, "output": "SELECT 2;"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = build_dataset(DataSection(path=str(path), max_length=60), tokenizer)
    assert (len(data.train), data.dropped) == (1, 1)
    with pytest.raises(QloraError, match=r"1 of 2 training examples \(first: row 2\)"):
        build_dataset(DataSection(path=str(path), max_length=60, truncated="fail"), tokenizer)


def test_dataset_columns_map_onto_alpaca_fields(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"question": "How many?", "context": "table t (a)", "answer": "SELECT COUNT(*) FROM t;"}]
    )
    section = DataSection(path=str(path), columns={"instruction": "question", "input": "context", "output": "answer"})
    example = build_dataset(section, tokenizer).train[0]
    learned = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert tokenizer.decode(learned[:-1]) == "SELECT COUNT(*) FROM t;"
    assert "table t (a)" in tokenizer.decode(example["input_ids"])


def test_invalid_rows_fail_names_every_bad_row_and_the_fix(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": " "}, {"instruction": "", "output": "b"}],
    )
    with pytest.raises(QloraError) as refused:
        build_dataset(DataSection(path=str(path)), tokenizer)
    assert str(refused.value).splitlines() == [
        f"{path}: 2 of 3 rows cannot train; fix them, or set data.invalid_rows: drop to skip such rows:",
        "    row 2: missing or empty field(s) output (alpaca rows need instruction and output)",
        "    row 3: missing or empty field(s) instruction (alpaca rows need instruction and output)",
    ]


def test_invalid_rows_drop_skips_them_and_says_how_many(tmp_path, tokenizer, caplog):
    rows = [
        {"instruction": "How many?", "output": "SELECT 1;"},
        {"instruction": "How many?", "output": ""},
        ["not", "an", "object"],
        {"output": "SELECT 2;"},
        {"instruction": "How many?", "input": 3, "output": "SELECT 3;"},
        {"instruction": "How many more?", "output": "SELECT 4;"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level("WARNING", logger="qlora_cli.data"):
        data = build_dataset(DataSection(path=str(path), invalid_rows="drop"), tokenizer)
    assert len(data.train) == 2
    assert [tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX][:-1]) for example in data.train] == [
        "SELECT 1;",
        "SELECT 4;",
    ]
    assert "dropping 4 of 6 rows" in caplog.text and "first: row 2: missing or empty field(s) output" in caplog.text


def test_invalid_rows_drop_applies_to_the_eval_file_too(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    evaluation = write_jsonl(
        tmp_path / "e.jsonl", [{"instruction": "a", "output": ""}, {"instruction": "c", "output": "d"}]
    )
    data = build_dataset(DataSection(path=str(train), eval_path=str(evaluation), invalid_rows="drop"), tokenizer)
    assert len(data.eval) == 1
    with pytest.raises(QloraError, match=r"e.jsonl: row 1: missing or empty"):
        build_dataset(DataSection(path=str(train), eval_path=str(evaluation)), tokenizer)


def test_invalid_rows_drop_with_no_row_left_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a"}, {"input": "x", "output": "b"}])
    with pytest.raises(
        QloraError, match=r"none of its 2 rows can train \(first: row 1: missing or empty field\(s\) output"
    ):
        build_dataset(DataSection(path=str(path), invalid_rows="drop"), tokenizer)


def test_eval_fraction_holds_out_a_seeded_random_sample(tmp_path, tokenizer):
    rows = [{"instruction": f"Row {number}?", "output": f"SELECT {number};"} for number in range(40)]
    train, held_out = hold_out(rows, 0.25, seed=7)
    assert len(held_out) == 10 and len(train) == 30
    assert sorted(map(str, train + held_out)) == sorted(map(str, rows)), "every row lands on exactly one side"
    assert held_out != rows[-10:], "not the file's tail (hub datasets are often sorted)"
    assert [rows.index(row) for row in held_out] == sorted(rows.index(row) for row in held_out), "file order kept"
    assert hold_out(rows, 0.25, seed=7) == (train, held_out)
    assert hold_out(rows, 0.25, seed=8)[1] != held_out
    # build_dataset holds out that sample for the seed it is given (train.seed), and for train.seed's default.
    section = DataSection(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), eval_fraction=0.25)
    expected = [
        tokenize_example(**render_example(row), tokenizer=tokenizer, max_length=section.max_length)["input_ids"]
        for row in held_out
    ]
    assert build_dataset(section, tokenizer, seed=7).eval["input_ids"] == expected
    default_seed = TrainSection.model_fields["seed"].default
    assert (
        build_dataset(section, tokenizer).eval["input_ids"]
        == build_dataset(section, tokenizer, seed=default_seed).eval["input_ids"]
    )
    assert build_dataset(section, tokenizer, seed=8).eval["input_ids"] != expected


def test_eval_fraction_that_leaves_no_training_row_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(QloraError, match="data.eval_fraction: holding out 1 of 1 rows"):
        build_dataset(DataSection(path=str(path), eval_fraction=0.5), tokenizer)


def test_every_training_example_of_the_tiny_recipe_ends_with_a_learned_eos(tmp_path, tiny_base):
    recipe = load_recipe(write_recipe(tmp_path, data={"max_rows": 8}))
    tokenizer = load_tokenizer(resolve_model_dir(recipe.model), recipe.model)
    data = build_dataset(recipe.data, tokenizer)
    for labels in data.train["labels"]:
        learned = [label for label in labels if label != IGNORE_INDEX]
        assert learned[-1] == tokenizer.eos_token_id
