"""The GPU acceptance run, checked where there is no GPU: scripts/gpu-check.sh's dry run and refusal, the wheel
pins inside pyproject's ranges, the `gpu` tier collected and skipped, the memory check's configurations predicted
by `qlora plan`, and the report built from a run's parts (tests/test_scripts.py shellchecks both scripts). Fast,
no network."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, run_script

from benchmarks import bench_plan

STEPS = ["install", "doctor", "gpu-tests", "plan-memory", "benchmark", "report"]


def no_gpu() -> bool:
    return (
        shutil.which("nvidia-smi") is None or subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode != 0
    )


def test_dry_run_names_every_step_with_its_command_and_budget(tmp_path):
    result = run_script("gpu-check.sh", "--dry-run", env={"QLORA_CHECK_DIR": str(tmp_path / "out")})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    listed = re.findall(r"^  (\S+) +(\d+) s  \+ (.+)$", out, flags=re.MULTILINE)
    assert [name for name, _, _ in listed] == STEPS
    assert sum(int(seconds) for _, seconds, _ in listed) <= 480  # the 8 minutes
    commands = {name: command for name, _, command in listed}
    assert "pip install -q --no-index --no-deps" in commands["install"] and "--target /tmp/site" in commands["install"]
    assert commands["doctor"].endswith("-m qlora_cli doctor recipes/tiny-sql.yaml")
    assert "-m pytest -m gpu tests/test_gpu.py tests/test_fastpath.py" in commands["gpu-tests"]
    assert "-m benchmarks.bench_plan measure --shape mistral7b" in commands["plan-memory"]
    assert (
        "-m benchmarks.bench --shape mistral7b --steps 2 --json" in commands["benchmark"]
        and "--markdown" in commands["benchmark"]
    )
    assert "-m benchmarks.bench_plan report" in commands["report"] and str(tmp_path / "out") in commands["report"]
    assert "dry run ok" in out and "HF_HUB_OFFLINE=1" in out
    assert not (tmp_path / "out").exists()  # wrote nothing


def test_dry_run_says_which_wheels_are_missing(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "trl-1.16.0-py3-none-any.whl").write_bytes(b"")
    result = run_script("gpu-check.sh", "--dry-run", env={"QLORA_WHEELS": str(wheels)})
    assert result.returncode == 0, result.stderr
    assert (
        "bitsandbytes==" in result.stdout
        and "lacks" in result.stdout
        and "trl==" not in result.stdout.split("lacks")[1].split("\n")[0]
    )


def test_dry_run_without_python_cannot_start(tmp_path):
    result = run_script("gpu-check.sh", "--dry-run", env={"PYTHON": str(tmp_path / "no-python")})
    assert result.returncode == 3
    assert "cannot start" in result.stderr and "no-python" in result.stderr


@pytest.mark.skipif(not no_gpu(), reason="a GPU is visible: a real run would start")
def test_real_run_without_a_gpu_exits_3_and_writes_nothing(tmp_path):
    result = run_script("gpu-check.sh", env={"QLORA_CHECK_DIR": str(tmp_path / "out")})
    assert result.returncode == 3, result.stdout + result.stderr
    assert "no GPU visible" in result.stderr and "--cpu" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shape", "llama"], "--shape must be mistral7b or small, not 'llama'"),
        (["--budget", "ten"], "--budget must be a number of seconds, at least 60"),
        (["--budget", "5"], "--budget must be a number of seconds, at least 60"),
        (["--bogus"], "unknown option --bogus"),
    ],
)
def test_usage_errors_exit_2(args, message):
    result = run_script("gpu-check.sh", *args)
    assert result.returncode == 2, result.stderr
    assert f"gpu-check.sh: {message}" in result.stderr.splitlines()


def test_help_documents_the_exit_codes():
    result = run_script("gpu-check.sh", "--help")
    assert result.returncode == 0
    for code in (
        "0 every step passed",
        "1 a step failed",
        "2 usage",
        "3 cannot start",
        "4 every step passed but a target",
    ):
        assert code in " ".join(result.stdout.split()), code


def test_wheels_dry_run_prints_the_one_download_command():
    result = run_script("gpu-wheels.sh", "--dry-run")
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert (
        line.startswith("+ ")
        and "-m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp" in line
    )
    assert "--platform manylinux_2_28_x86_64" in line and "--platform manylinux2014_x86_64" in line
    pins = run_script("gpu-wheels.sh", "--list").stdout.split()
    assert pins and all(pin in line.split() for pin in pins)


def test_wheel_pins_fall_in_the_package_ranges():
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = dict(pin.split("==") for pin in run_script("gpu-wheels.sh", "--list").stdout.split())
    assert {"bitsandbytes", "trl", "peft", "datasets", "pydantic"} <= set(pins)  # what the GPU box lacks
    assert len(pins) == len(set(pins))  # one version of each: two stop `pip install --no-index`
    pyproject = (REPO / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", pyproject, flags=re.MULTILINE | re.DOTALL).group(1)
    for requirement in map(Requirement, re.findall(r'"([^"]+)"', dependencies)):
        if requirement.name in pins:
            assert Version(pins[requirement.name]) in requirement.specifier, (
                f"{requirement.name}=={pins[requirement.name]} not in {requirement}"
            )


def test_gpu_tier_is_collected_and_skipped_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the gpu tier runs for real (scripts/gpu-check.sh)")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "gpu",
            str(REPO / "tests" / "test_gpu.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    skipped = re.match(r"(\d+) skipped in ", summary)  # only skips: nothing passed, failed or errored
    assert skipped and int(skipped.group(1)) > 0, summary
    assert "needs a CUDA GPU" in result.stdout


def test_memory_configurations_validate_and_plan_predicts_each(tmp_path):
    bench_plan.write_config("mistral7b", tmp_path / "base")  # config.json and tokenizer only: no weights
    rows = []
    for configuration in bench_plan.configurations("mistral7b"):
        recipe = bench_plan.recipe_for(configuration, str(tmp_path / "base"), "cuda", str(tmp_path / "work"))
        assert (recipe.lora.r, recipe.train.batch_size, recipe.data.max_length) == (
            configuration.r,
            configuration.batch_size,
            configuration.max_length,
        )
        assert recipe.train.gradient_checkpointing == configuration.gradient_checkpointing
        rows.append(bench_plan.predict(recipe))
    small, large, unchecked = rows
    assert small["tokens_per_micro_batch"] == 2048 and large["tokens_per_micro_batch"] == 4 * 2048
    # Mistral-7B's 4.13 GB of NF4 weights is the floor; adapter and activations add to it, and the CUDA
    # context, which the allocator never sees, is in the total only.
    assert 4.1e9 < small["predicted_bytes"] < large["predicted_bytes"] < small["predicted_total_bytes"] + 20e9
    assert unchecked["predicted_bytes"] > small["predicted_bytes"]  # every layer's activations kept
    assert all(row["predicted_bytes"] < row["predicted_total_bytes"] for row in rows)
    assert {"4-bit base weights", "LoRA weights", "activation checkpoints", "CUDA context"} <= set(small["components"])


def test_compare_marks_the_ten_percent_target():
    within = bench_plan.compare({"predicted_bytes": 105, "measured_bytes": 100})
    outside = bench_plan.compare({"predicted_bytes": 85, "measured_bytes": 100})
    unmeasured = bench_plan.compare({"predicted_bytes": 85, "measured_bytes": None})
    assert within["within_target"] is True and within["error_share"] == pytest.approx(0.05)
    assert outside["within_target"] is False and outside["error_share"] == pytest.approx(-0.15)
    assert unmeasured["within_target"] is None


JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="2" failures="1">
<testcase classname="tests.test_gpu" name="test_loss_falls" time="12.5">
  <properties><property name="loss" value="2.100 -> 0.300" /></properties>
</testcase>
<testcase classname="tests.test_gpu" name="test_resume" time="30.1"><failure message="AssertionError: step 44 differs">long text</failure></testcase>
</testsuite></testsuites>
"""


def plan_row(name: str, predicted: int, measured: int) -> dict:
    return bench_plan.compare(
        {
            "name": name,
            "predicted_bytes": predicted,
            "measured_bytes": measured,
            "tokens_per_step": [2048] * 3,
            "tokens_per_micro_batch": 2048,
            "load_peak_bytes": measured // 2,
            "reserved_peak_bytes": measured + 2**30,
            "paged_optimizer_bytes": 2**28,
        }
    )


def write_work(work: Path, *, plan_error: float, failing_step: bool) -> None:
    work.mkdir()
    steps = [
        ("install", "-", 0, 0, "(skipped: no wheels in .whl)"),
        ("doctor", 0, 9, 30, "python3 -m qlora_cli doctor recipes/tiny-sql.yaml"),
        ("gpu-tests", 1 if failing_step else 0, 80, 120, "python3 -m pytest -m gpu tests/test_gpu.py"),
        ("benchmark", 0, 200, 250, "python3 -m benchmarks.bench --shape mistral7b"),
    ]
    (work / "steps.tsv").write_text("".join("\t".join(map(str, step)) + "\n" for step in steps))
    (work / "gpu-tests.log").write_text("collected 6 items\n...\nFAILED tests/test_gpu.py::test_resume\n")
    (work / "pytest.xml").write_text(JUNIT)
    measured = 10 * 2**30
    plan = {
        "shape": "mistral7b",
        "steps": 3,
        "rows": [plan_row("r=16, 1 x 2048", int(measured * (1 + plan_error)), measured)],
    }
    (work / "plan.json").write_text(json.dumps(plan))
    (work / "bench.json").write_text(json.dumps({"rows": [{"arm": "qlora", "tokens_per_second": 5000.0}]}))
    (work / "bench.md").write_text(
        "# Training benchmark\n\n| arm | tokens/s |\n|---|---:|\n| (c) qlora | 5,000 |\n\n## What ran\n\n```\n# not a heading\n```\n"
    )


def test_report_gathers_the_steps_tests_memory_and_benchmark(tmp_path, capsys):
    write_work(tmp_path / "work", plan_error=0.04, failing_step=True)
    code = bench_plan.main(
        [
            "report",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "out"),
            "--command",
            "bash scripts/gpu-check.sh",
            "--budget",
            "470",
        ]
    )
    assert code == 4  # a step failed
    markdown = (tmp_path / "out" / "BENCHMARKS.md").read_text()
    record = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert markdown.startswith("# GPU acceptance run")
    assert "| gpu-tests | FAILED (exit 1) | 80 | 120 | `python3 -m pytest -m gpu tests/test_gpu.py` |" in markdown
    assert "| install | skipped |" in markdown and "| doctor | ok | 9 | 30 |" in markdown
    assert "| test_loss_falls | passed | 12.5 | loss 2.100 -> 0.300 |" in markdown
    assert "| test_resume | failed | 30.1 | AssertionError: step 44 differs |" in markdown
    assert "| r=16, 1 x 2048 | 2,048 | 10.40 | 10.00 | +4.0% | yes |" in markdown
    assert "met: plan within 10% of measured peak: r=16, 1 x 2048 (+4.0%)" in markdown
    assert "## Training benchmark" in markdown and "### What ran" in markdown and "\n# not a heading\n" in markdown
    assert "FAILED tests/test_gpu.py::test_resume" in markdown  # the failing step's output, at the end
    assert [step["name"] for step in record["steps"]] == ["install", "doctor", "gpu-tests", "benchmark"]
    assert record["steps"][2]["exit_code"] == 1 and record["steps"][0]["exit_code"] is None
    assert record["benchmark"]["rows"][0]["tokens_per_second"] == 5000.0
    assert record["plan_vs_measured"]["rows"][0]["within_target"] is True
    assert set(bench_plan.LIBRARIES) <= set(record["versions"]) and record["versions"]["torch"] != "not installed"
    assert {"gpu", "driver", "torch_cuda", "cuda_available"} <= set(record["device"])
    assert record["command"] == "bash scripts/gpu-check.sh" and record["budget_seconds"] == 470
    assert "step failed: gpu-tests" in capsys.readouterr().out


def test_report_exit_code_says_whether_every_target_was_met(tmp_path):
    write_work(tmp_path / "good", plan_error=-0.08, failing_step=False)
    assert bench_plan.main(["report", str(tmp_path / "good"), "--out", str(tmp_path / "good-out")]) == 0
    write_work(tmp_path / "missed", plan_error=0.25, failing_step=False)
    assert bench_plan.main(["report", str(tmp_path / "missed"), "--out", str(tmp_path / "missed-out")]) == 4
    markdown = (tmp_path / "missed-out" / "BENCHMARKS.md").read_text()
    assert "NOT met: plan within 10% of measured peak" in markdown and "| +25.0% | NO |" in markdown


def test_report_from_an_empty_work_folder_still_writes_both_files(tmp_path):
    (tmp_path / "work").mkdir()
    assert bench_plan.main(["report", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "gpu-check.json").read_text())["steps"] == []
    assert (tmp_path / "out" / "BENCHMARKS.md").read_text().startswith("# GPU acceptance run")


def test_report_judges_a_gpu_benchmark_by_its_own_targets(tmp_path):
    write_work(tmp_path / "work", plan_error=0.02, failing_step=False)
    rows = [
        {"arm": "tutorial", "speedup": 1.0, "memory_ratio": 1.0, "mfu": 0.2},
        {"arm": "qlora", "speedup": 2.5, "memory_ratio": 0.5, "mfu": 0.3},
    ]  # MFU under its 40% target
    (tmp_path / "work" / "bench.json").write_text(json.dumps({"device": "cuda", "rows": rows}))
    assert bench_plan.main(["report", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 4
    targets = json.loads((tmp_path / "out" / "gpu-check.json").read_text())["targets"]
    judged = {
        target["target"].split(":")[1].split(">=")[0].split("<=")[0].strip(): target["met"]
        for target in targets
        if target["target"].startswith("benchmark:")
    }
    assert judged == {"(c) real tokens/s": True, "(c) peak memory": True, "(c) MFU": False}
