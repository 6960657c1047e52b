"""Bad input gets one clear error: exit code 1, the key/row/file/adapter named, no traceback, nothing written."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, write_recipe

from qlora_cli.cli import main


def run_cli(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`qlora ARGV` in this process, through the real entry point: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["qlora", *argv])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def edit(path: Path, **sections) -> Path:
    recipe = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        recipe[section].update(values)
    path.write_text(yaml.safe_dump(recipe))
    return path


def data_file(folder: Path, text: str | bytes, name: str = "bad.jsonl") -> str:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def pickle_only_base(folder: Path) -> str:
    import torch
    from safetensors.torch import load_file

    base = folder / "pickled-base"
    base.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / "base" / name, base / name)
    torch.save(load_file(TINY / "base" / "model.safetensors"), base / "pytorch_model.bin")
    return str(base)


CASES = {
    "malformed yaml": (lambda d, r: r.write_text("model:\n  id: x\n\tbad: 1\n"), "malformed YAML at line 3, column 1"),
    "not a mapping": (lambda d, r: r.write_text("- model\n"), "must be a mapping"),
    "unknown key": (lambda d, r: edit(r, train={"epoch": 2}), "train.epoch: unknown key; did you mean 'epochs'?"),
    "wrong type": (lambda d, r: edit(r, train={"batch_size": "many"}), "train.batch_size"),
    "rank not positive": (lambda d, r: edit(r, lora={"r": 0}), "lora.r: Input should be greater than 0"),
    "alpha not positive": (lambda d, r: edit(r, lora={"alpha": 0}), "lora.alpha"),
    "dropout out of range": (lambda d, r: edit(r, lora={"dropout": 1.0}), "lora.dropout"),
    "learning rate not positive": (lambda d, r: edit(r, train={"lr": -1.0e-4}), "train.lr"),
    "targets match nothing": (
        lambda d, r: edit(r, lora={"target_modules": ["query"]}),
        "its linear layers are: down_proj",
    ),
    "contradictory quantization": (
        lambda d, r: edit(r, model={"load_in_4bit": False, "quant_type": "fp4"}),
        "quant_type only apply",
    ),
    "missing data file": (lambda d, r: edit(r, data={"path": str(d / "nope.jsonl")}), "data.path: file not found"),
    "empty data": (lambda d, r: edit(r, data={"path": data_file(d, "\n")}), "has no rows"),
    "row missing a field": (
        lambda d, r: edit(
            r, data={"path": data_file(d, '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')}
        ),
        "bad.jsonl: row 2: missing or empty field(s) output",
    ),
    "malformed jsonl line": (
        lambda d, r: edit(r, data={"path": data_file(d, '{"instruction": "a", "output": "b"}\n{"instruction": \n')}),
        "bad.jsonl: line 2: malformed JSON",
    ),
    "non-utf8 bytes": (
        lambda d, r: edit(r, data={"path": data_file(d, b'{"instruction": "\xff", "output": "b"}\n')}),
        "at byte offset 17",
    ),
    "responses cut off": (
        lambda d, r: edit(r, data={"max_length": 8, "truncated": "fail"}),
        "have their whole response beyond 8 tokens",
    ),
    "token in recipe": (
        lambda d, r: edit(r, model={"revision": "hf_" + "x" * 34}),
        "model.revision: looks like an access token",
    ),
    "remote code unpinned": (lambda d, r: edit(r, model={"trust_remote_code": True}), "needs a pinned revision"),
    "needs cuda": (
        lambda d, r: edit(r, model={"device": "cuda"}),
        "try the CPU demo: qlora train recipes/tiny-sql.yaml",
    ),
    "pickle weights only": (
        lambda d, r: edit(r, model={"id": pickle_only_base(d)}),
        "found pickle weights pytorch_model.bin: refused",
    ),
    "output is the filesystem root": (
        lambda d, r: edit(r, train={"output_dir": "/"}),
        "refusing to write into the filesystem root",
    ),
    "output is the current directory": (
        lambda d, r: edit(r, train={"output_dir": "."}),
        "refusing to write into the current directory",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_training_input_fails_cleanly(case, tmp_path, tiny_base, capsys, monkeypatch):
    if case == "needs cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, data={"eval_path": None})
    CASES[case][0](tmp_path, recipe)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, _, err = run_cli(["train", str(recipe), "--adapters-dir", str(tmp_path / "adapters")], capsys, monkeypatch)
    assert code == 1
    assert CASES[case][1] in err
    assert "Traceback" not in err and err.count("error:") == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "nothing may be written"


def test_unknown_adapter_lists_the_available_ones(tmp_path, capsys, monkeypatch):
    (tmp_path / "adapters" / "sql").mkdir(parents=True)
    (tmp_path / "adapters" / "sql" / "adapter_config.json").write_text("{}")
    code, _, err = run_cli(
        ["generate", "-a", "sqll", "hi", "--adapters-dir", str(tmp_path / "adapters")], capsys, monkeypatch
    )
    assert code == 1 and "adapter 'sqll' not found" in err and "available: sql" in err


@pytest.mark.parametrize(
    "name, message",
    [
        ("../sql", "adapter ../sql: no adapter_config.json in that folder"),
        ("a b", "adapter name 'a b': use letters, digits, '.', '_' or '-' only (no paths); or pass a folder path"),
        ("", "adapter name '': use letters, digits"),
    ],
)
def test_adapter_names_with_path_characters_are_refused(name, message, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["generate", "-a", name, "hi", "--adapters-dir", str(tmp_path)], capsys, monkeypatch)
    assert code == 1 and message in err and "Traceback" not in err


def test_force_never_replaces_a_folder_qlora_did_not_make(tmp_path, tiny_base, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("irreplaceable")
    recipe = write_recipe(tmp_path, train={"output_dir": str(mine)})
    code, _, err = run_cli(
        ["train", str(recipe), "--force", "--adapters-dir", str(tmp_path / "adapters")], capsys, monkeypatch
    )
    assert code == 1 and "was not written by qlora" in err
    assert (mine / "thesis.txt").read_text() == "irreplaceable"
    assert json.loads(json.dumps(sorted(p.name for p in mine.iterdir()))) == ["thesis.txt"]


def test_eval_names_a_missing_data_file_before_loading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        ["eval", "--data", "held-out.jsonl", "-a", "none", "--adapters-dir", str(tmp_path)], capsys, monkeypatch
    )
    assert code == 1 and "--data: file not found: held-out.jsonl" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
