"""Crash safety with real subprocesses: kill -9, SIGTERM, NaN, a full disk, corrupt checkpoints."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import QLORA, assert_resumed_as_straight, qlora, read_until, run_script, write_recipe
from safetensors.torch import load_file

from qlora_cli import checkpoints, train
from qlora_cli.errors import ExitCode, QloraError
from qlora_cli.recipe import load_recipe

pytestmark = pytest.mark.pipeline
STEPS = 8
# The target; measured: 0.0 (the resumed run repeats the uninterrupted one bit for bit).
RESUME_TOLERANCE = 1e-5
QUICK = {"max_steps": STEPS, "save_steps": STEPS // 2, "logging_steps": 1, "lr": 2.0e-3}
# Which event of the second half the kill -9 test kills at; set it to repeat a failure.
KILL_SEED = int(os.environ.get("QLORA_KILL_SEED", random.randrange(1000)))


def train_args(recipe: Path, home: Path, *extra: str) -> list[str]:
    return ["train", str(recipe), "--adapters-dir", str(home), *extra]


def train_ok(recipe: Path, home: Path, *extra: str) -> None:
    done = qlora(*train_args(recipe, home, *extra))
    assert done.returncode == 0, done.stderr[-3000:]


def wait_for(predicate, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def kill_points(run_dir: Path, lines: list[str]) -> dict[str, object]:
    """Moments in the second half of a run, each an event the test sees: a logged step, or the last save begun."""
    points = {
        f"after step {step} is logged": lambda step=step: any(line.startswith(f"step {step}/") for line in lines)
        for step in range(STEPS // 2 + 1, STEPS)
    }
    last = f"checkpoint-{STEPS}"
    points[f"once the save of {last} has begun"] = lambda: (
        (run_dir / checkpoints.STAGING / last).exists() or (run_dir / last).exists()
    )
    return points


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_base):
    home = tmp_path / "adapters"
    steps = {**QUICK, "batch_size": 8}
    straight = write_recipe(tmp_path, "straight", train=steps, data={"max_rows": 200, "eval_path": None})
    resumed = write_recipe(tmp_path, "resumed", train=steps, data={"max_rows": 200, "eval_path": None})
    train.run(load_recipe(straight), adapters_dir=str(home))  # in this process: the same numbers, no start-up

    process = subprocess.Popen(
        [*QLORA, *train_args(resumed, home)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(line) for line in process.stdout], daemon=True).start()
    run_dir = tmp_path / "runs" / "resumed"
    points = kill_points(run_dir, lines)
    moment = random.Random(KILL_SEED).choice(sorted(points))
    print(f"kill -9 {moment} (QLORA_KILL_SEED={KILL_SEED})")
    wait_for(lambda: (run_dir / f"checkpoint-{STEPS // 2}").is_dir(), process)
    wait_for(points[moment], process)
    process.send_signal(signal.SIGKILL)
    process.wait()

    refused = qlora(*train_args(resumed, home))
    assert refused.returncode == ExitCode.RUN_INTERRUPTED, refused.stderr[-2000:]
    resume_with = f"qlora train {run_dir} --resume --adapters-dir {home}"
    assert "holds an interrupted run" in refused.stderr and resume_with in " ".join(refused.stderr.split())
    train_ok(run_dir, home, "--resume")  # the command it printed: the run folder holds the recipe it started with

    assert_resumed_as_straight(tmp_path / "runs" / "straight", run_dir, home, RESUME_TOLERANCE)
    # Speed is this session's tokens over this session's time: the restored tokens were trained before.
    metrics = json.loads((run_dir / checkpoints.METRICS).read_text())
    restored = json.loads((run_dir / f"checkpoint-{metrics['resumed_at_step']}" / "trainer_state.json").read_text())
    assert metrics["session_tokens"] == metrics["tokens_seen"] - restored["num_input_tokens_seen"]
    assert metrics["tokens_per_second"] * metrics["train_seconds"] == pytest.approx(
        metrics["session_tokens"], rel=0.02, abs=5
    )


def test_resume_refuses_a_changed_recipe_unless_forced(tmp_path, tiny_base, run_cli):
    home = tmp_path / "adapters"
    recipe = write_recipe(
        tmp_path, "changed", train={**QUICK, "max_steps": 2, "save_steps": 1}, data={"max_rows": 40, "eval_path": None}
    )
    train.run(load_recipe(recipe), adapters_dir=str(home))
    # As if it had been interrupted after its checkpoints: no metrics, no adapter yet.
    (tmp_path / "runs" / "changed" / "metrics.json").unlink()
    shutil.rmtree(home / "changed")
    code, _, err = run_cli(
        train_args(recipe, home, "--resume", "--set", "train.lr=1.0e-3", "--set", "train.batch_size=4")
    )
    assert code == ExitCode.USER_ERROR
    assert "train.lr: 0.002 -> 0.001" in err and "train.batch_size: 16 -> 4" in err
    code, _, err = run_cli(train_args(recipe, home, "--resume", "--force", "--set", "train.max_steps=3"))
    assert code == 0, err[-2000:]
    assert json.loads((tmp_path / "runs" / "changed" / "metrics.json").read_text())["steps"] == 3


def test_sigterm_saves_at_the_step_boundary_and_exits_143(tmp_path, tiny_base):
    home = tmp_path / "adapters"
    recipe = write_recipe(
        tmp_path,
        "spot",
        train={**QUICK, "max_steps": 200, "save_steps": 1000},
        data={"max_rows": 400, "eval_path": None},
    )
    process = subprocess.Popen(
        [*QLORA, *train_args(recipe, home)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    run_dir = tmp_path / "runs" / "spot"
    # The first logged step: the trainer, and the signal handler installed around it, are running.
    assert any(line.startswith("step 1/") for line in process.stdout), process.communicate()
    process.send_signal(signal.SIGTERM)
    # Once the handler has taken the first signal, a second one comes during the save and must not corrupt it.
    handled = read_until(process.stderr, "SIGTERM received: saving a checkpoint")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    stderr = handled + stderr
    assert process.returncode == ExitCode.TERMINATED == 143, stderr
    assert "stopped by SIGTERM" in stderr
    assert f"Continue with: qlora train {run_dir} --resume --adapters-dir {home}" in " ".join(stderr.split())
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
    assert "last good checkpoint" in str(caught.value) and caught.value.exit_code == ExitCode.DIVERGED
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


def started_run(tmp_path: Path, name: str, **train_keys) -> tuple[object, Path]:
    """A run folder as a run killed before its first checkpoint leaves it, and its recipe."""
    recipe = load_recipe(
        write_recipe(tmp_path, name, train={**QUICK, **train_keys}, data={"max_rows": 40, "eval_path": None})
    )
    run_dir = Path(recipe.train.output_dir)
    train._start_run_dir(run_dir, recipe, force=False)
    return recipe, run_dir


def exit_code_of(recipe, home: Path, **options) -> ExitCode:
    with pytest.raises(QloraError) as caught:
        train.run(recipe, adapters_dir=str(home), **options)
    return caught.value.exit_code


def test_the_run_folder_decides_the_exit_code_before_any_work(tmp_path, tiny_base):
    home = tmp_path / "adapters"
    recipe, run_dir = started_run(tmp_path, "early")
    assert checkpoints.RunMarker.load(run_dir) == checkpoints.RunMarker(adapter="early")
    assert exit_code_of(recipe, home) == ExitCode.RUN_EXISTS
    assert exit_code_of(recipe, home, resume=True) == ExitCode.NO_CHECKPOINT

    staged = run_dir / checkpoints.STAGING / "checkpoint-2"
    staged.mkdir(parents=True)
    (staged / "trainer_state.json").write_text("{}")
    checkpoints.commit(staged, run_dir, keep=2)
    assert checkpoints.RunFolder.load(run_dir).interrupted
    assert exit_code_of(recipe, home) == ExitCode.RUN_INTERRUPTED

    shutil.rmtree(run_dir)
    assert exit_code_of(recipe, home, resume=True) == ExitCode.NOTHING_TO_RESUME
    run_dir.mkdir()  # someone's own folder: no marker, not replaced, a plain problem to fix
    assert exit_code_of(recipe, home) == ExitCode.USER_ERROR
    assert exit_code_of(recipe, home, force=True) == ExitCode.USER_ERROR
    assert not home.exists()


def test_train_resilient_follows_the_real_exit_codes_to_a_fresh_start(tmp_path, tiny_base):
    # A run killed before its first checkpoint: plain train says RUN_EXISTS, --resume says NO_CHECKPOINT,
    # and the wrapper starts over with --force, which trains and exports.
    recipe, run_dir = started_run(tmp_path, "restart", max_steps=2, save_steps=1)
    home = tmp_path / "adapters"
    result = run_script(
        "train-resilient.sh",
        *("--backoff", "0", "--max-retries", "0", str(tmp_path / "restart.yaml"), "--adapters-dir", str(home)),
        env={"QLORA_VENV": str(Path(sys.executable).parent.parent)},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"qlora exited {int(ExitCode.RUN_EXISTS)}: switching to: resume" in result.stderr
    assert f"qlora exited {int(ExitCode.NO_CHECKPOINT)}: switching to: fresh-force" in result.stderr
    assert "attempt 3" in result.stderr and "--force" in result.stderr
    assert (home / "restart" / "adapter_model.safetensors").is_file()
    assert checkpoints.RunFolder.load(run_dir).finished
