"""Bad input gets one clear error: exit code 1, the key/row/file/adapter named, no traceback, nothing written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY, write_recipe


def data_file(folder: Path, text: str | bytes, name: str = "bad.jsonl") -> str:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def pickle_only_base(folder: Path) -> str:
    from safetensors.torch import load_file

    base = folder / "pickled-base"
    base.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / "base" / name, base / name)
    torch.save(load_file(TINY / "base" / "model.safetensors"), base / "pytorch_model.bin")
    return str(base)


# Each case: the recipe's raw text, or the sections to change in the tiny recipe; then the line the user reads
# ({d} is the test's folder).
CASES = {
    "malformed yaml": (
        lambda d: "model:\n  id: x\n\tbad: 1\n",
        "{d}/tiny.yaml: malformed YAML at line 3, column 1: found character '\\t' that cannot start any token",
    ),
    "not a mapping": (
        lambda d: "- model\n",
        "{d}/tiny.yaml: a recipe must be a mapping of sections (model, lora, data, train), not list",
    ),
    "unknown key": (lambda d: dict(train={"epoch": 2}), "train.epoch: unknown key; did you mean 'epochs'?"),
    "wrong type": (
        lambda d: dict(train={"batch_size": "many"}),
        "train.batch_size: Input should be a valid integer, unable to parse string as an integer (got 'many')",
    ),
    "rank not positive": (lambda d: dict(lora={"r": 0}), "lora.r: Input should be greater than 0 (got 0)"),
    "alpha not positive": (lambda d: dict(lora={"alpha": 0}), "lora.alpha: Input should be greater than 0 (got 0)"),
    "dropout out of range": (
        lambda d: dict(lora={"dropout": 1.0}),
        "lora.dropout: Input should be less than 1 (got 1.0)",
    ),
    "learning rate not positive": (
        lambda d: dict(train={"lr": -1.0e-4}),
        "train.lr: Input should be greater than 0 (got -0.0001)",
    ),
    "targets match nothing": (
        lambda d: dict(lora={"target_modules": ["query"]}),
        "lora.target_modules: none of ['query'] is a linear layer of this model; its linear layers are: "
        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or use 'all-linear')",
    ),
    "contradictory quantization": (
        lambda d: dict(model={"load_in_4bit": False, "quant_type": "fp4"}),
        "model: quant_type only apply with load_in_4bit: true; remove them or set load_in_4bit: true",
    ),
    "missing data file": (
        lambda d: dict(data={"path": str(d / "nope.jsonl")}),
        "data.path: file not found: {d}/nope.jsonl",
    ),
    "empty data": (lambda d: dict(data={"path": data_file(d, "\n")}), "data.path: {d}/bad.jsonl has no rows"),
    "row missing a field": (
        lambda d: dict(data={"path": data_file(d, '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')}),
        "{d}/bad.jsonl: row 2: missing or empty field(s) output (alpaca rows need instruction and output); "
        "fix the row, or set data.invalid_rows: drop to skip such rows",
    ),
    "malformed jsonl line": (
        lambda d: dict(data={"path": data_file(d, '{"instruction": "a", "output": "b"}\n{"instruction": \n')}),
        "{d}/bad.jsonl: line 2: malformed JSON: Expecting value (column 17)",
    ),
    "non-utf8 bytes": (
        lambda d: dict(data={"path": data_file(d, b'{"instruction": "\xff", "output": "b"}\n')}),
        "{d}/bad.jsonl: not UTF-8: invalid byte 0xff at byte offset 17",
    ),
    "responses cut off": (
        lambda d: dict(data={"max_length": 8, "truncated": "fail"}),
        "data.max_length: 1500 of 1500 training examples (first: row 1) have their whole response beyond 8 tokens; "
        "raise data.max_length or set data.truncated: drop",
    ),
    "token in recipe": (
        lambda d: dict(model={"revision": "hf_" + "x" * 34}),
        "model.revision: looks like an access token; tokens never go in a recipe — export HF_TOKEN instead",
    ),
    "remote code unpinned": (
        lambda d: dict(model={"trust_remote_code": True}),
        "model: trust_remote_code: true needs a pinned revision (a commit hash), so the code you run is the code you read",
    ),
    "needs cuda": (
        lambda d: dict(model={"device": "cuda"}),
        "but torch sees no CUDA GPU (torch {torch}). Run on a GPU box, set --set model.device=cpu for a small model, "
        "or try the CPU demo: qlora train recipes/tiny-sql.yaml",
    ),
    "pickle weights only": (
        lambda d: dict(model={"id": pickle_only_base(d)}),
        "model.id: no .safetensors weights in {d}/pickled-base (found pickle weights pytorch_model.bin: refused, "
        "they can run arbitrary code)",
    ),
    "output is the filesystem root": (
        lambda d: dict(train={"output_dir": "/"}),
        "train.output_dir: refusing to write into the filesystem root (/); name a new folder",
    ),
    "output is the current directory": (
        lambda d: dict(train={"output_dir": "."}),
        "train.output_dir: refusing to write into the current directory ({d}); name a new folder",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_training_input_fails_cleanly(case, tmp_path, tiny_base, run_cli, monkeypatch):
    if case == "needs cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    bad = CASES[case][0](tmp_path)  # a recipe's raw text, or the sections to change in the tiny one
    if isinstance(bad, str):
        recipe = tmp_path / "tiny.yaml"
        recipe.write_text(bad)
    else:
        recipe = write_recipe(tmp_path, **bad | {"data": {"eval_path": None, **bad.get("data", {})}})
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, _, err = run_cli(["train", str(recipe), "--adapters-dir", str(tmp_path / "adapters")])
    assert code == 1
    assert CASES[case][1].format(d=tmp_path, torch=torch.__version__) in err
    assert "Traceback" not in err and err.count("error:") == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "nothing may be written"


def test_unknown_adapter_lists_the_available_ones(tmp_path, run_cli):
    (tmp_path / "adapters" / "sql").mkdir(parents=True)
    (tmp_path / "adapters" / "sql" / "adapter_config.json").write_text("{}")
    code, _, err = run_cli(["generate", "-a", "sqll", "hi", "--adapters-dir", str(tmp_path / "adapters")])
    assert code == 1 and "adapter 'sqll' not found" in err and "available: sql" in err


@pytest.mark.parametrize(
    "name, message",
    [
        ("../sql", "adapter ../sql: no adapter_config.json in that folder"),
        ("a b", "adapter name 'a b': use letters, digits, '.', '_' or '-' only (no paths); or pass a folder path"),
        ("", "adapter name '': use letters, digits"),
    ],
)
def test_adapter_names_with_path_characters_are_refused(name, message, tmp_path, run_cli):
    code, _, err = run_cli(["generate", "-a", name, "hi", "--adapters-dir", str(tmp_path)])
    assert code == 1 and message in err and "Traceback" not in err


def test_force_never_replaces_a_folder_qlora_did_not_make(tmp_path, tiny_base, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("irreplaceable")
    recipe = write_recipe(tmp_path, train={"output_dir": str(mine)})
    code, _, err = run_cli(["train", str(recipe), "--force", "--adapters-dir", str(tmp_path / "adapters")])
    assert code == 1 and "was not written by qlora" in err
    assert (mine / "thesis.txt").read_text() == "irreplaceable"
    assert json.loads(json.dumps(sorted(p.name for p in mine.iterdir()))) == ["thesis.txt"]


def test_eval_names_a_missing_data_file_before_loading_anything(tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["eval", "--data", "held-out.jsonl", "-a", "none", "--adapters-dir", str(tmp_path)])
    assert code == 1 and "--data: file not found: held-out.jsonl" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
