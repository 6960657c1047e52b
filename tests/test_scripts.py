"""The shell scripts and launcher configs: shellcheck-clean, --help and --dry-run answer, the retry wrapper
really retries (with a fake `qlora` first on PATH), sync really leaves unfinished writes behind, and every
accelerate config loads with accelerate's own parser. Fast, no network, no GPU."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import BASH, REPO, free_port, read_until, run_script, shellcheck

from qlora_cli.errors import ExitCode, QloraError

SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_shellcheck_clean(script: Path):
    result = subprocess.run([shellcheck(), "--shell=bash", str(script)], capture_output=True, text=True)
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


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("train-resilient.sh", "unknown option --no-such-option (qlora train options go after RECIPE)"),
        ("sync.sh", "unknown option --no-such-option"),
    ],
)
def test_unknown_option_is_a_usage_error(name: str, message: str):
    result = run_script(name, "--no-such-option")
    assert result.returncode == 2
    assert f"{name}: {message}" in result.stderr.splitlines()


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
# The wrapper branches on qlora's exit codes only (ExitCode); the fake qlora exits with them.

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


def exits(code: int, message: str = "") -> str:
    """A fake qlora call that prints `message` as qlora would (red "error: " line) and exits `code`."""
    return (f"echo {shlex.quote('error: ' + message)} >&2; " if message else "") + f"exit {int(code)}"


def train_resilient(tmp_path: Path, cases: dict, *args: str) -> subprocess.CompletedProcess:
    return run_script("train-resilient.sh", "--backoff", "0", *args, env=fake_qlora(tmp_path, cases))


def script_exit_codes() -> dict[str, int]:
    text = (REPO / "scripts" / "train-resilient.sh").read_text()
    return {name: int(value) for name, value in re.findall(r"^EXIT_([A-Z_]+)=(\d+)$", text, flags=re.MULTILINE)}


def test_train_resilient_knows_qlora_exit_codes_by_their_values():
    known = script_exit_codes()
    assert {"USER_ERROR", "USAGE", "RUN_INTERRUPTED", "RUN_EXISTS", "NOTHING_TO_RESUME", "NO_CHECKPOINT"} <= set(known)
    assert known == {name: ExitCode[name].value for name in known}


def test_train_resilient_help_says_what_each_exit_code_does():
    usage = run_script("train-resilient.sh", "--help").stdout
    for code in set(ExitCode) - {ExitCode.DOES_NOT_FIT}:  # every code `qlora train` can exit with
        assert re.search(rf"\b{code.value}\b", usage), f"--help does not say what exit {code.value} ({code.name}) does"


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
    stopped = "echo 'error: stopped by SIGTERM at step 3' >&2; exit 143"
    result = train_resilient(tmp_path, {1: stopped, 2: "exit 0"}, "recipes/tiny-sql.yaml", "--set", "lora.r=4")
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == [
        ["train", "recipes/tiny-sql.yaml", "--set", "lora.r=4"],
        ["train", "recipes/tiny-sql.yaml", "--set", "lora.r=4", "--resume"],
    ]
    assert "attempt 2" in result.stderr and "exit 143" in result.stderr
    assert "T" in result.stderr.split("]")[0]  # timestamped log lines: [2025-01-01T00:00:00Z]


@pytest.mark.parametrize(
    "code", [ExitCode.INTERRUPTED, ExitCode.TERMINATED, 137, ExitCode.CRASH, 99], ids=lambda code: str(int(code))
)
def test_train_resilient_retries_with_resume_after(tmp_path: Path, code: int):
    # Preempted (130/143, a checkpoint saved), killed (137), crashed (70, traceback shown) or anything unknown.
    result = train_resilient(tmp_path, {1: exits(code), 2: "exit 0"}, "r.yaml")
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == [["train", "r.yaml"], ["train", "r.yaml", "--resume"]]
    assert f"failed with exit {int(code)}" in result.stderr


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (ExitCode.OK, ""),
        (ExitCode.USER_ERROR, "adapter: adapters/sql already exists; pass --force to replace it"),
        (ExitCode.USAGE, "No such option: --sett"),
        (ExitCode.DIVERGED, "loss became nan at step 3; stopped without exporting an adapter"),
    ],
    ids=lambda value: value.name if isinstance(value, ExitCode) else None,
)
def test_train_resilient_does_not_retry(tmp_path: Path, code: ExitCode, message: str):
    result = train_resilient(tmp_path, {"*": exits(code, message)}, "r.yaml", "--set", "lora.r=4")
    assert result.returncode == code, result.stderr
    assert calls(tmp_path) == [["train", "r.yaml", "--set", "lora.r=4"]]  # never forces over an adapter
    assert message in result.stderr  # qlora's own words reach the user
    if code != ExitCode.OK:
        assert "not retried" in result.stderr


@pytest.mark.parametrize("code", [ExitCode.RUN_INTERRUPTED, ExitCode.RUN_EXISTS], ids=lambda code: code.name)
def test_train_resilient_rerun_continues_the_run_in_the_folder(tmp_path: Path, code: ExitCode):
    # Running the same command again (a new box, same disk) picks the run up: idempotent, no retry used.
    result = train_resilient(tmp_path, {1: exits(code), 2: "exit 0"}, "--max-retries", "0", "r.yaml")
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == [["train", "r.yaml"], ["train", "r.yaml", "--resume"]]


def test_train_resilient_starts_fresh_when_there_is_nothing_to_resume(tmp_path: Path):
    result = train_resilient(tmp_path, {1: exits(ExitCode.NOTHING_TO_RESUME), 2: "exit 0"}, "r.yaml", "--resume")
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == [["train", "r.yaml", "--resume"], ["train", "r.yaml"]]


def test_train_resilient_starts_fresh_when_killed_before_any_checkpoint(tmp_path: Path):
    result = train_resilient(tmp_path, {1: "exit 137", 2: exits(ExitCode.NO_CHECKPOINT), 3: "exit 0"}, "r.yaml")
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == [["train", "r.yaml"], ["train", "r.yaml", "--resume"], ["train", "r.yaml", "--force"]]


@pytest.mark.parametrize(
    ("code", "args"),
    [
        (ExitCode.RUN_INTERRUPTED, ["--resume"]),  # a mode code that does not fit the mode it answers
        (ExitCode.NOTHING_TO_RESUME, []),
        (ExitCode.NO_CHECKPOINT, []),
    ],
    ids=lambda value: value.name if isinstance(value, ExitCode) else None,
)
def test_train_resilient_stops_on_a_mode_code_that_does_not_fit(tmp_path: Path, code: ExitCode, args: list[str]):
    result = train_resilient(tmp_path, {"*": exits(code)}, "r.yaml", *args)
    assert result.returncode == code, result.stderr
    assert len(calls(tmp_path)) == 1 and "not retried" in result.stderr


def test_train_resilient_switches_mode_at_most_twice_in_a_row(tmp_path: Path):
    # A folder qlora keeps answering RUN_EXISTS for, and NOTHING_TO_RESUME under --resume: no endless loop.
    cases = {1: exits(ExitCode.RUN_EXISTS), 2: exits(ExitCode.NOTHING_TO_RESUME), 3: exits(ExitCode.RUN_EXISTS)}
    result = train_resilient(tmp_path, cases, "r.yaml")
    assert result.returncode == ExitCode.RUN_EXISTS, result.stderr
    assert calls(tmp_path) == [["train", "r.yaml"], ["train", "r.yaml", "--resume"], ["train", "r.yaml"]]


def test_train_resilient_ignores_the_wording_of_messages(tmp_path: Path):
    # The words that once chose the mode, with a plain user-error code: the code decides, not the text.
    message = "train.output_dir: runs/x holds an interrupted run; continue it with --resume"
    result = train_resilient(tmp_path, {"*": exits(ExitCode.USER_ERROR, message)}, "r.yaml")
    assert result.returncode == ExitCode.USER_ERROR
    assert calls(tmp_path) == [["train", "r.yaml"]]


def test_train_resilient_gives_up_after_max_retries(tmp_path: Path):
    result = train_resilient(tmp_path, {"*": "kill -9 $$"}, "--max-retries", "2", "r.yaml")
    assert result.returncode == 137
    assert len(calls(tmp_path)) == 3
    assert "giving up after 2 retries" in result.stderr


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
    # The wrapper logs this line once its 60 s back-off has started and a signal can end it.
    seen = read_until(process.stderr, "retrying with --resume in 60s")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 143, seen + stderr
    assert len(calls(tmp_path)) == 1
    assert "received SIGTERM while waiting: not retrying" in stderr


def test_train_resilient_ctrl_c_lets_qlora_save_and_report(tmp_path: Path):
    # Ctrl-C signals the whole process group: qlora saves and still gets its last words out, the wrapper
    # passes them on and exits 130 without retrying. "ready" says the fake's trap is set; its save then
    # lasts until the test, having seen it start ("saving") with the wrapper still running, writes "done".
    state = tmp_path / "state"
    saving = (
        f'trap \'kill "$blocker"; touch {state}/saving; until [ -e {state}/done ]; do sleep 0.05; done; '
        'echo "error: stopped by SIGINT at step 3" >&2; exit 130\' INT TERM; '
        f"tail -f /dev/null >/dev/null 2>&1 & blocker=$!; touch {state}/ready; wait"
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

    def wait_for(path: Path) -> None:
        deadline = time.monotonic() + 60
        while not path.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"timed out waiting for {path.name}"
            time.sleep(0.05)

    wait_for(state / "ready")
    os.killpg(process.pid, signal.SIGINT)
    wait_for(state / "saving")
    assert process.poll() is None, "the wrapper left while qlora was still saving"
    (state / "done").touch()
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert len(calls(tmp_path)) == 1
    # qlora's last words come before the wrapper's verdict, which knows qlora's exit code: it waited.
    reported = stderr.index("error: stopped by SIGINT at step 3")
    assert stderr.index("received SIGINT: not retrying (qlora exited 130)") > reported


def test_train_resilient_without_qlora_exits_127(tmp_path: Path):
    result = run_script("train-resilient.sh", "r.yaml", env={"QLORA_VENV": str(tmp_path / "none")})
    assert result.returncode == 127
    assert (
        f"train-resilient.sh: no qlora at {tmp_path / 'none'}/bin/qlora; run scripts/setup.sh or set QLORA_VENV"
        in result.stderr.splitlines()
    )


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
    ("args", "message"),
    [
        (["push", "s3://bucket/runs", "runs"], "sync.sh: push: SRC must be a local folder, got s3://bucket/runs"),
        (["pull", "runs", "me@host:runs"], "sync.sh: pull: DEST must be a local folder, got me@host:runs"),
        (["copy", "a", "b"], "sync.sh: first argument must be push or pull, got copy"),
        (["push", "a"], "sync.sh: expected push|pull SRC DEST"),
    ],
)
def test_sync_rejects_wrong_directions(args: list[str], message: str):
    result = run_script("sync.sh", "--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr.splitlines()


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
    # What QLoRA under FSDP needs: the 4-bit weights loaded on rank 0 and broadcast, flattened without orig params.
    fsdp = config.fsdp_config
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_sync_module_states"] is True
    assert fsdp["fsdp_use_orig_params"] is False


def test_deepspeed_zero3_qlora_config():
    config = load("deepspeed-zero3-qlora.yaml")
    assert config.distributed_type.value == "DEEPSPEED"
    assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_init_flag"] is True


@pytest.mark.parametrize(
    ("name", "flag"),
    [("fsdp-qlora.yaml", "ACCELERATE_USE_FSDP"), ("deepspeed-zero3-qlora.yaml", "ACCELERATE_USE_DEEPSPEED")],
)
def test_sharded_config_command_passes_the_sharding_check_only_as_written(name, flag, monkeypatch):
    """The command in the config's first line trains under that launch; without its --set, qlora refuses."""
    from qlora_cli.recipe import load_recipe
    from qlora_cli.train import check_sharding

    words = (REPO / "configs" / name).read_text().splitlines()[0].split()
    recipe, overrides = words[words.index("train") + 1], words[words.index("--set") + 1 :: 2]
    monkeypatch.setenv(flag, "true")  # what `accelerate launch` sets for this config
    check_sharding(load_recipe(REPO / recipe, overrides))
    with pytest.raises(QloraError) as refused:
        check_sharding(load_recipe(REPO / recipe))
    assert str(refused.value) == (
        "model.quant_storage: uint8 under FSDP/DeepSpeed ZeRO-3, which shard parameters of one dtype; "
        "add --set model.quant_storage=bfloat16 (the packed 4-bit weights are the same size)"
    )


def test_ddp_and_multi_node_configs():
    ddp = load("ddp.yaml")
    assert ddp.distributed_type.value == "MULTI_GPU" and ddp.num_machines == 1
    nodes = load("multi-node.yaml")
    assert (nodes.num_machines, nodes.machine_rank, nodes.rdzv_backend) == (2, 0, "static")
    assert nodes.main_process_ip and nodes.main_process_port
    single = load("single-gpu.yaml")
    assert single.distributed_type.value == "NO" and single.num_processes == 1


PROBE = """
from accelerate import PartialState
state = PartialState(cpu=True)  # what the trainer does when qlora trains on the CPU (use_cpu=True)
# One file per rank: two processes printing to one pipe can interleave mid-line.
with open(f"rank{state.process_index}.txt", "w") as out:
    out.write(f"rank {state.process_index} of {state.num_processes} {state.distributed_type.value} {state.backend}")
"""


def test_cpu_2proc_config_really_starts_two_gloo_processes(tmp_path: Path):
    port = free_port()  # in case 29501 is taken
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
