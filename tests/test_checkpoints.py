"""Checkpoints and the run folder on disk: commits, pruning, the fall-back past a torn checkpoint, and the records
read back. Files only; the crash tests that make these folders by training are in test_resume.py."""

import json

from qlora_cli import checkpoints
from qlora_cli.files import MARKER


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_complete_one(tmp_path, caplog):
    for step in (2, 4, 6):
        staged = tmp_path / checkpoints.STAGING / f"checkpoint-{step}"
        staged.mkdir(parents=True)
        (staged / "adapter_model.safetensors").write_bytes(b"x" * 100)
        checkpoints.commit(staged, tmp_path, keep=5)
    (tmp_path / "checkpoint-6" / "adapter_model.safetensors").write_bytes(b"x" * 10)  # torn write
    (tmp_path / "checkpoint-8").mkdir()  # a save that never finished: no manifest
    assert checkpoints.latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert (
        "checkpoint-8: no manifest" in caplog.text
        and "checkpoint-6: adapter_model.safetensors has 10 bytes" in caplog.text
    )


def test_old_checkpoints_are_pruned_only_after_a_newer_one_is_complete(tmp_path):
    for step in (1, 2, 3):
        staged = tmp_path / checkpoints.STAGING / f"checkpoint-{step}"
        staged.mkdir(parents=True)
        (staged / "state.json").write_text("{}")
        checkpoints.commit(staged, tmp_path, keep=2)
    assert [p.name for p in checkpoints.all_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]


def test_records_read_back_from_the_run_folder(tmp_path):
    (tmp_path / MARKER).write_text(json.dumps({"kind": "adapter", "name": "sql"}))
    assert checkpoints.RunMarker.load(tmp_path) is None  # another output's marker is not a run's
    checkpoints.RunMarker(adapter="sql").write(tmp_path)
    run = checkpoints.RunFolder.load(tmp_path)
    assert run.marker == checkpoints.RunMarker(adapter="sql") and run.recipe_yaml is None and not run.interrupted

    staged = tmp_path / checkpoints.STAGING / "checkpoint-3"
    staged.mkdir(parents=True)
    (staged / "optimizer.pt").write_bytes(b"x" * 7)
    checkpoints.commit(staged, tmp_path, keep=1)
    assert checkpoints.Manifest.load(tmp_path / "checkpoint-3") == checkpoints.Manifest({"optimizer.pt": 7})
    assert checkpoints.RunFolder.load(tmp_path).latest == tmp_path / "checkpoint-3"
    (tmp_path / "checkpoint-3" / checkpoints.MANIFEST).write_text('{"files": ["optimizer.pt"]}')
    assert checkpoints.problem(tmp_path / "checkpoint-3") == "unreadable manifest"
