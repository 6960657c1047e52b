"""Two processes on the CPU through `accelerate launch` (gloo): the path multi-GPU users take."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, free_port, write_recipe

from qlora_cli import checkpoints, train
from qlora_cli.model import fingerprint_weights
from qlora_cli.recipe import load_recipe

pytestmark = pytest.mark.pipeline
QUICK = {"max_steps": 4, "logging_steps": 1, "save_steps": 4, "batch_size": 8}


def history(run_dir: Path) -> list[dict]:
    state = checkpoints.latest_checkpoint(run_dir) / "trainer_state.json"
    return [entry for entry in json.loads(state.read_text())["log_history"] if "loss" in entry]


def test_two_cpu_processes_train_one_adapter_and_log_the_mean_loss(tmp_path, tiny_base):
    home = tmp_path / "adapters"
    single = write_recipe(tmp_path, "single", train=QUICK, data={"max_rows": 200, "eval_path": None})
    double = write_recipe(tmp_path, "double", train=QUICK, data={"max_rows": 200, "eval_path": None})
    train.run(load_recipe(single), adapters_dir=str(home))  # in this process: one start-up less
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "cpu-2proc.yaml"),
    ]
    # A timeout far above a loaded machine's minutes: a rank that hangs in a collective fails the test.
    result = subprocess.run(
        [*launch, "-m", "qlora_cli", "train", str(double), "--adapters-dir", str(home)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    assert sorted(path.name for path in home.iterdir()) == ["double", "single"]  # one adapter, written once
    run_dir = tmp_path / "runs" / "double"
    written = sorted(path.name for path in run_dir.iterdir())
    assert written == [
        "checkpoint-4",
        "log_history.json",
        "loss.png",
        "metrics.json",
        "qlora.json",
        "recipe.yaml",
        "report.md",
        "tensorboard",
    ]
    one, two = history(tmp_path / "runs" / "single"), history(run_dir)
    # Steps are split across ranks: each optimizer step sees twice the examples, so twice the epoch.
    # (Packed rows hold a varying number of examples, so not exactly twice.)
    assert two[-1]["epoch"] == pytest.approx(2 * one[-1]["epoch"], rel=0.1)
    # The logged loss is the mean over ranks (a sum would read ~2x the single-process loss).
    first_single, first_double = one[0]["loss"], two[0]["loss"]
    print(f"step-1 loss: 1 process {first_single:.3f}, 2 processes {first_double:.3f}")
    assert first_double == pytest.approx(first_single, rel=0.1)


def test_fsdp_wraps_the_4bit_model_and_the_adapter_is_written_whole(tmp_path, tiny_base):
    """FSDP flattens each unit into one buffer of one dtype: fp32 norms beside bf16-stored 4-bit weights
    failed ("Must flatten tensors with uniform dtype"), and rank 0 alone saving its shard wrote an empty adapter."""
    from safetensors.torch import load_file

    recipe = write_recipe(
        tmp_path,
        "sharded",
        model={"compute_dtype": "bfloat16", "quant_storage": "bfloat16"},
        data={"max_rows": 20, "eval_path": None},
    )
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    env = {**os.environ, "ACCELERATE_USE_FSDP": "true", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "fsdp_worker.py"),
        str(recipe),
        str(adapters),
    ]
    # Its own session: torchrun signals its whole process group when it shuts down, pytest included.
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, start_new_session=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = load_file(adapters / "sharded" / "adapter_model.safetensors")
    before = load_file(adapters / "before.safetensors")
    assert set(saved) == set(before) and saved
    for name, tensor in saved.items():
        assert tensor.shape == before[name].shape and tensor.numel() > 0, name
        assert torch.equal(tensor, before[name]), name  # no optimizer step: the gathered adapter is the initial one
    record = json.loads((adapters / "sharded" / "qlora.json").read_text())
    assert record["base"]["fingerprint"] == fingerprint_weights(tiny_base)
