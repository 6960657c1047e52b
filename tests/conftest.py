"""Offline by design: no hub, no network. Tests run the real libraries on the shipped tiny base."""

import os

# Before anything imports Hugging Face code: a test that reaches for the hub must fail, not download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import qlora_cli  # noqa: E402,F401  (sets OMP_WAIT_POLICY before torch loads)

# isort: split

# Mistral's real tokenizers (tests/real_tokenizers.py) as fixtures for every module.
pytest_plugins = ["real_tokenizers"]

from helpers import QLORA, REPO, TINY  # noqa: E402

# Started from a background job (nohup, `cmd &`, some CI runners), the suite inherits SIGINT ignored, and an
# ignored signal stays ignored in every process it starts: qlora, the wrapper scripts and the chat would never
# see the Ctrl-C their tests send. Ctrl-C behaves here as at a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)

TRAINING = pytest.StashKey[tuple[Path, dict[str, subprocess.Popen]]]()


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    assert (TINY / "base" / "model.safetensors").is_file(), "the shipped tiny base is missing: python -m tools.pretrain"
    return TINY / "base"


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """`run_cli(ARGV)`: `qlora ARGV` in this process through the real entry point, as (exit code, stdout, stderr)."""
    from qlora_cli.cli import main

    def run(argv: list[str]) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["qlora", *argv])
        with pytest.raises(SystemExit) as exited:
            main()
        captured = capsys.readouterr()
        return exited.value.code, captured.out, captured.err

    return run


ADAPTER_TASKS = ("sql", "json")


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected what will not run
def pytest_collection_modifyitems(session, config, items):
    """The demo's two adapters take most of the suite's CPU time to train. When a selected test needs them,
    they start training now, in two background processes, and the tests that use them run last: the rest
    of the suite runs meanwhile, and `trained_adapters` waits for the processes to finish."""
    needs_adapters = [item for item in items if "trained_adapters" in getattr(item, "fixturenames", ())]
    if not needs_adapters or config.option.collectonly:
        return
    items[:] = [item for item in items if item not in needs_adapters] + needs_adapters
    folder = Path(tempfile.mkdtemp(prefix="qlora-trained-adapters-"))
    # One thread each: two processes share the two cores better than one two-threaded run after another.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config.stash[TRAINING] = (folder, {task: _start_training(task, folder, env) for task in ADAPTER_TASKS})


def _start_training(task: str, folder: Path, env: dict) -> subprocess.Popen:
    """`qlora train recipes/tiny-TASK.yaml` shortened to two epochs so the suite stays within CI's budget
    (the demo trains three)."""
    overrides = ["--set", f"train.output_dir={folder / 'runs' / task}", "--set", "train.epochs=2.0"]
    command = [*QLORA, "train", str(REPO / "recipes" / f"tiny-{task}.yaml"), *overrides]
    with (folder / f"{task}.log").open("w") as log:
        return subprocess.Popen(
            [*command, "--adapters-dir", str(folder / "adapters")], stdout=log, stderr=subprocess.STDOUT, env=env
        )


def pytest_sessionfinish(session, exitstatus):
    if TRAINING in session.config.stash:
        folder, processes = session.config.stash[TRAINING]
        for process in processes.values():
            process.kill()  # a no-op for one that finished; stops one left running by -x or Ctrl-C
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def trained_adapters(pytestconfig) -> Path:
    """The adapters home holding the demo's two adapters (sql, json), trained on the shipped tiny base."""
    folder, processes = pytestconfig.stash[TRAINING]
    for task, process in processes.items():
        if process.wait() != 0:
            log = (folder / f"{task}.log").read_text()[-3000:]
            pytest.fail(f"training the {task} adapter failed (exit {process.returncode}):\n{log}")
    return folder / "adapters"
