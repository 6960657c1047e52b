"""Crash safety with real subprocesses: kill -9, SIGTERM, NaN, a full disk, corrupt checkpoints."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file

from qlora_cli import checkpoints, train
from qlora_cli.errors import QloraError
from qlora_cli.recipe import load_recipe

pytestmark = pytest.mark.pipeline
STEPS = 8
# The target; measured: 0.0 (the resumed run repeats the uninterrupted one bit for bit).
RESUME_TOLERANCE = 1e-5
QUICK = {"max_steps": STEPS, "save_steps": STEPS // 2, "logging_steps": 1, "lr": 2.0e-3}


def train_command(recipe: Path, home: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qlora_cli", "train", str(recipe), "--adapters-dir", str(home), *extra]


def step_losses(run_dir: Path) -> dict[int, float]:
    final = checkpoints.latest_checkpoint(run_dir)
    history = json.loads((final / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def wait_for(predicate, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_base):
    home = tmp_path / "adapters"
    straight = write_recipe(tmp_path, "straight", train=QUICK, data={"max_rows": 200, "eval_path": None})
    resumed = write_recipe(tmp_path, "resumed", train=QUICK, data={"max_rows": 200, "eval_path": None})
    subprocess.run(train_command(straight, home), check=True, capture_output=True)

    process = subprocess.Popen(train_command(resumed, home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "runs" / "resumed"
    wait_for(lambda: (run_dir / f"checkpoint-{STEPS // 2}").is_dir(), process)
    time.sleep(random.uniform(0.0, 1.5))  # somewhere in the second half, maybe mid-save
    process.send_signal(signal.SIGKILL)
    process.wait()

    refused = subprocess.run(train_command(resumed, home), capture_output=True, text=True)
    assert refused.returncode == 1 and "holds an interrupted run" in refused.stderr and "--resume" in refused.stderr
    subprocess.run(train_command(resumed, home, "--resume"), check=True, capture_output=True)

    expected, got = step_losses(tmp_path / "runs" / "straight"), step_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(expected)
    worst = max(abs(expected[step] - got[step]) for step in expected)
    print(f"resume equivalence: largest per-step loss difference {worst:.2e}")
    assert worst <= RESUME_TOLERANCE
    assert all(expected[step] == got[step] for step in range(1, STEPS // 2 + 1))  # the first half is the same run
    a, b = (
        load_file(home / "straight" / "adapter_model.safetensors"),
        load_file(home / "resumed" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(a[key].dtype == torch.float32 and torch.equal(a[key], b[key]) for key in a)


def test_resume_refuses_a_changed_recipe_unless_forced(tmp_path, tiny_base):
    home = tmp_path / "adapters"
    recipe = write_recipe(
        tmp_path, "changed", train={**QUICK, "max_steps": 2, "save_steps": 1}, data={"max_rows": 40, "eval_path": None}
    )
    subprocess.run(train_command(recipe, home), check=True, capture_output=True)
    # As if it had been interrupted after its checkpoints: no metrics, no adapter yet.
    (tmp_path / "runs" / "changed" / "metrics.json").unlink()
    shutil.rmtree(home / "changed")
    changed = subprocess.run(
        train_command(recipe, home, "--resume", "--set", "train.lr=1.0e-3", "--set", "train.batch_size=4"),
        capture_output=True,
        text=True,
    )
    assert changed.returncode == 1
    assert "train.lr: 0.002 -> 0.001" in changed.stderr and "train.batch_size: 16 -> 4" in changed.stderr
    forced = subprocess.run(
        train_command(recipe, home, "--resume", "--force", "--set", "train.max_steps=3"), capture_output=True, text=True
    )
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert json.loads((tmp_path / "runs" / "changed" / "metrics.json").read_text())["steps"] == 3


def test_sigterm_saves_at_the_step_boundary_and_exits_143(tmp_path, tiny_base):
    home = tmp_path / "adapters"
    recipe = write_recipe(
        tmp_path,
        "spot",
        train={**QUICK, "max_steps": 200, "save_steps": 1000},
        data={"max_rows": 400, "eval_path": None},
    )
    process = subprocess.Popen(train_command(recipe, home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "spot"
    # The first logged step: the trainer, and the signal handler installed around it, are running.
    assert any(line.startswith("step 1/") for line in process.stdout), process.communicate()
    process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # a second signal during the save must not corrupt it
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    saved = checkpoints.latest_checkpoint(run_dir)
    assert saved is not None and checkpoints.problem(saved) is None and 0 < checkpoints.checkpoint_step(saved) < 200
    assert not (home / "spot").exists(), "an interrupted run exports no adapter"


def test_nan_loss_stops_keeps_the_last_good_checkpoint_and_exports_nothing(tmp_path, tiny_base):
    recipe = load_recipe(
        write_recipe(
            tmp_path, "nan", train={**QUICK, "lr": 1.0e30, "save_steps": 1, "warmup_ratio": 0.0}, data={"max_rows": 80}
        )
    )
    with pytest.raises(QloraError, match=r"loss became (nan|inf) at step \d+") as caught:
        train.run(recipe, adapters_dir=str(tmp_path / "adapters"))
    assert "last good checkpoint" in str(caught.value)
    assert not (tmp_path / "adapters" / "nan").exists()
    for checkpoint in checkpoints.complete_checkpoints(tmp_path / "runs" / "nan"):
        weights = load_file(checkpoint / "adapter_model.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_base, monkeypatch):
    import transformers.trainer

    recipe = load_recipe(
        write_recipe(
            tmp_path, "full", train={**QUICK, "max_steps": 4, "save_steps": 2}, data={"max_rows": 80, "eval_path": None}
        )
    )
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        calls.append(path)
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(transformers.trainer.torch, "save", save_until_the_disk_fills)  # fault injection only
    with pytest.raises(QloraError, match="No space left on device; checkpoint-2 is intact"):
        train.run(recipe, adapters_dir=str(tmp_path / "adapters"))
    run_dir = tmp_path / "runs" / "full"
    assert [path.name for path in checkpoints.all_checkpoints(run_dir)] == ["checkpoint-2"]
    assert checkpoints.problem(run_dir / "checkpoint-2") is None
    assert not (run_dir / checkpoints.STAGING / "checkpoint-4").exists()
    assert not (tmp_path / "adapters").exists() or not any((tmp_path / "adapters").iterdir())


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


def test_a_planted_token_never_reaches_any_file(tmp_path, tiny_base, monkeypatch):
    token = "hf_" + "PlantedTokenForTheLeakTest" + "x" * 10
    monkeypatch.setenv("HF_TOKEN", token)
    recipe = load_recipe(
        write_recipe(tmp_path, "leak", train={**QUICK, "max_steps": 2, "save_steps": 1}, data={"max_rows": 32})
    )
    train.run(recipe, adapters_dir=str(tmp_path / "adapters"))
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(written) > 10
    assert not [path for path in written if token.encode() in path.read_bytes()]
