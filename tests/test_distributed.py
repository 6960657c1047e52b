"""Two processes on the CPU through `accelerate launch` (gloo): the path multi-GPU users take."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_recipe
from qlora_cli import checkpoints

pytestmark = pytest.mark.pipeline
QUICK = {"max_steps": 4, "logging_steps": 1, "save_steps": 4}


def history(run_dir: Path) -> list[dict]:
    state = checkpoints.latest_checkpoint(run_dir) / "trainer_state.json"
    return [entry for entry in json.loads(state.read_text())["log_history"] if "loss" in entry]


def test_two_cpu_processes_train_one_adapter_and_log_the_mean_loss(tmp_path, tiny_base):
    home = tmp_path / "adapters"
    single = write_recipe(tmp_path, "single", train=QUICK, data={"max_rows": 200, "eval_path": None})
    double = write_recipe(tmp_path, "double", train=QUICK, data={"max_rows": 200, "eval_path": None})
    subprocess.run([sys.executable, "-m", "qlora_cli", "train", str(single), "--adapters-dir", str(home)], check=True, capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "cpu-2proc.yaml")]
    result = subprocess.run([*launch, "-m", "qlora_cli", "train", str(double), "--adapters-dir", str(home)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    assert sorted(path.name for path in home.iterdir()) == ["double", "single"]  # one adapter, written once
    run_dir = tmp_path / "runs" / "double"
    written = sorted(path.name for path in run_dir.iterdir())
    assert written == ["checkpoint-4", "loss.png", "metrics.json", "qlora.json", "recipe.yaml", "report.md", "tensorboard"]
    one, two = history(tmp_path / "runs" / "single"), history(run_dir)
    # Steps are split across ranks: each optimizer step sees twice the examples, so twice the epoch.
    # (Packed rows hold a varying number of examples, so not exactly twice.)
    assert two[-1]["epoch"] == pytest.approx(2 * one[-1]["epoch"], rel=0.1)
    # The logged loss is the mean over ranks (a sum would read ~2x the single-process loss).
    first_single, first_double = one[0]["loss"], two[0]["loss"]
    print(f"step-1 loss: 1 process {first_single:.3f}, 2 processes {first_double:.3f}")
    assert first_double == pytest.approx(first_single, rel=0.1)
