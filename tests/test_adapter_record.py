"""qlora.json read through one type: what train writes loads typed, old folders still load, and every reader
gets the same base resolution and the same refusal of a different base. No model is loaded."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qlora_cli import adapters
from qlora_cli.adapters import AdapterRecord, BaseRecord, check_one_base
from qlora_cli.cli import app
from qlora_cli.errors import QloraError
from qlora_cli.generate import BASE, Session
from qlora_cli.prompts import Style

FINGERPRINT = "sha256:" + "1" * 32


def trained_adapter(home: Path, name: str = "sql", base_id: str = "org/base", fingerprint: str = FINGERPRINT) -> Path:
    """An adapter folder as train.export_adapter lays it out, weights aside."""
    folder = home / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base_id}))
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"model": {"id": base_id, "compute_dtype": "float32"}}))
    adapters.write_metadata(
        folder,
        name=name,
        recipe_file=str(home / f"{name}.yaml"),
        base={"id": base_id, "revision": None, "fingerprint": fingerprint, "architecture": "LlamaForCausalLM"},
        template="alpaca",
        template_text=None,
        template_sha256=None,
        system=None,
        end_of_turn=["</s>"],
        format="alpaca",
        task="reverse",
        lora={
            "r": 8,
            "alpha": 16.0,
            "target_modules": "all-linear",
            "use_dora": False,
            "use_rslora": False,
            "lora_plus_ratio": None,
            "init": "kaiming",
        },
        method="sft",
        parent=None,
        data={"path": "data/train.jsonl", "examples": 400, "columns": {"instruction": "question"}},
        metrics={"train_loss": 0.25, "examples": 400, "peak_memory": "1.00 GiB RAM (peak RSS)"},
    )
    return folder


def test_the_record_train_writes_loads_typed_and_reads_back_as_written(tmp_path):
    folder = trained_adapter(tmp_path)
    record = AdapterRecord.load(folder)
    assert record.base == BaseRecord(
        id="org/base", revision=None, fingerprint=FINGERPRINT, architecture="LlamaForCausalLM"
    )
    assert (record.task, record.lora.r, record.lora.target_modules, record.data.examples) == (
        "reverse",
        8,
        "all-linear",
        400,
    )
    assert record.metrics["examples"] == 400 and isinstance(record.metrics["examples"], int)
    assert record.as_written() == json.loads((folder / "qlora.json").read_text())


def test_a_record_built_in_code_writes_what_train_writes(tmp_path):
    written = AdapterRecord.load(trained_adapter(tmp_path / "by-hand"))
    (tmp_path / "typed").mkdir()
    typed = written.model_copy(update={"folder": tmp_path / "typed"})
    typed.write()
    again = json.loads((tmp_path / "typed" / "qlora.json").read_text())
    by_hand = json.loads((written.folder / "qlora.json").read_text())
    assert list(again) == list(by_hand)  # same keys, same order
    assert {key: again[key] for key in again if key != "created"} == {
        key: by_hand[key] for key in by_hand if key != "created"
    }


def test_a_folder_without_a_record_reads_as_an_alpaca_adapter_on_the_base_peft_names(tmp_path, tiny_base):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    record = AdapterRecord.load(folder)
    assert (record.name, record.template, record.task, record.base.fingerprint) == ("plain", "alpaca", "forward", None)
    assert record.as_written() == {"name": "plain", "base": {}, "template": "alpaca", "task": "forward"}
    assert record.base_section().id == "org/base"
    # --base wins over what was recorded; a local folder is made absolute
    assert record.base_section(str(tiny_base)).id == str(tiny_base.resolve())


def test_the_base_comes_from_the_adapters_recipe(tmp_path):
    section = AdapterRecord.load(trained_adapter(tmp_path)).base_section()
    assert (section.id, section.compute_dtype) == ("org/base", "float32")


def test_a_base_with_other_weights_is_refused_unless_allowed(tmp_path):
    record = AdapterRecord.load(trained_adapter(tmp_path))
    other = "sha256:" + "2" * 32
    with pytest.raises(QloraError) as refused:
        record.check_base("org/other", other)
    assert str(refused.value) == (
        f"adapter 'sql' was trained on org/base ({FINGERPRINT}), but the base being loaded is org/other ({other}); "
        "pass --allow-base-mismatch if you know they are the same model"
    )
    record.check_base("org/other", other, allow_mismatch=True)
    record.check_base("org/base", FINGERPRINT)


def test_adapters_on_different_bases_cannot_share_one(tmp_path):
    sql = AdapterRecord.load(trained_adapter(tmp_path, "sql"))
    json_ = AdapterRecord.load(trained_adapter(tmp_path, "json", base_id="org/other", fingerprint="sha256:" + "2" * 32))
    check_one_base([sql, sql])
    with pytest.raises(QloraError, match=r"different bases and cannot share one: sql \(org/base\), json \(org/other\)"):
        check_one_base([sql, json_])


def test_an_unreadable_record_names_the_file(tmp_path):
    folder = trained_adapter(tmp_path)
    for broken in ("{not json", "[]", json.dumps({"lora": {"r": "eight"}})):
        (folder / "qlora.json").write_text(broken)
        with pytest.raises(QloraError, match=r"qlora.json: not a readable adapter record"):
            AdapterRecord.load(folder)


def test_the_base_is_prompted_as_the_first_adapter_was_trained():
    session = Session(model=None, tokenizer=None, base_id="b", styles={"sql": Style(task="reverse")})
    assert session.style(BASE) == session.style("sql") == Style(template="alpaca", task="reverse")
    assert Session(model=None, tokenizer=None, base_id="b").style(BASE) == Style(template="alpaca", task="forward")


def test_adapters_list_and_show_read_the_record(tmp_path):
    trained_adapter(tmp_path)
    runner = CliRunner()
    listed = runner.invoke(app, ["adapters", "list", "--adapters-dir", str(tmp_path)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if line.startswith("sql "))
    assert row.split()[:5] == ["sql", "org/base", "8", "data/train.jsonl", "0.25"]
    shown = runner.invoke(app, ["adapters", "show", "sql", "--adapters-dir", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert shown.output.startswith(f"# {tmp_path / 'sql'}\n{(tmp_path / 'sql' / 'qlora.json').read_text()}")
    assert "# recipe.yaml\nmodel:" in shown.output
    empty = runner.invoke(app, ["adapters", "list", "--adapters-dir", str(tmp_path / "none-here")])
    assert (
        " ".join(empty.output.split())
        == f"no adapters in the folder {tmp_path / 'none-here'}/ yet; qlora train writes them there"
    )
