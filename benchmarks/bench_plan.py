"""Memory check: `qlora plan`'s predicted peak against torch.cuda.max_memory_allocated, and the report of a GPU run.

    python -m benchmarks.bench_plan measure --json plan.json        # three configurations, Mistral-7B shape, CUDA
    python -m benchmarks.bench_plan measure --shape small           # the same code path on a small shape (CPU too)
    python -m benchmarks.bench_plan report WORK --out gpu-check     # BENCHMARKS.md + gpu-check.json from WORK's parts

measure: a Mistral-shaped base with random weights (no download) is saved once as bf16 safetensors. Each
configuration then runs in its own fresh process through the stages `qlora train` uses: model.load_model
(4-bit NF4, double quantization), lora.attach_lora, train.sft_config and train.CheckpointingTrainer, for a few
optimizer steps on rows of exactly max_length tokens, so that every micro-batch holds batch_size x max_length
tokens: what plan assumes (packing fills every row). The peak of torch.cuda.max_memory_allocated from the end
of loading to the last step is compared with memory.predicted_max_allocated: plan.run's estimate less the CUDA
context, the allocator's slack and bitsandbytes' paged optimizer state, none of which torch's allocator counts.

report: scripts/gpu-check.sh runs each step with its output in WORK/<step>.log and one line per step in
WORK/steps.tsv; this gathers those, the benchmark's and the memory check's JSON and pytest's JUnit XML into
BENCHMARKS.md and gpu-check.json, with the device, the driver and CUDA, and the library versions.
Exit codes (report): 0 written and every target met; 4 written, a target missed or a step failed; 1 error.
"""

from __future__ import annotations

import qlora_cli  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

# isort: split

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from benchmarks.bench import TokenCounter, paged_optimizer_bytes
from qlora_cli.adapters import library_versions
from qlora_cli.testing import SMALL_SHAPE, build_base, run_in_fresh_process, save_base_config

log = logging.getLogger(__name__)

GIB = 2**30
STEPS = 3  # optimizer steps per configuration: the peak is reached in the first two (the optimizer's state appears in step 1)
TARGET_ERROR = 0.10  # the target: the prediction within 10% of the measured peak
SEED = 0
# Model shapes. mistral7b is transformers.MistralConfig()'s defaults (d 4096, 32 layers, ffn 14336, 32/8 heads,
# vocab 32000): 7.24 B parameters, 14.5 GB in bf16. small (testing.SMALL_SHAPE) runs the same code in seconds on CPU cores.
SHAPES = {
    "mistral7b": {"config": {}, "max_length": None},
    "small": {
        "config": SMALL_SHAPE,
        "max_length": 128,
    },
}
LIBRARIES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "pydantic",
    "liger-kernel",
    "safetensors",
    "tokenizers",
    "huggingface-hub",
    "triton",
    "numpy",
    "pytest",
)
# Steps of scripts/gpu-check.sh whose output files this report reads.
PLAN_JSON, BENCH_JSON, BENCH_MARKDOWN, PYTEST_XML, STEPS_TSV = (
    "plan.json",
    "bench.json",
    "bench.md",
    "pytest.xml",
    "steps.tsv",
)


@dataclasses.dataclass(frozen=True)
class Configuration:
    r: int
    batch_size: int
    max_length: int
    gradient_checkpointing: bool
    why: str

    @property
    def name(self) -> str:
        return f"r={self.r}, {self.batch_size} x {self.max_length}" + (
            "" if self.gradient_checkpointing else ", no checkpointing"
        )


# Three settings that move different terms of the estimate: weights and adapter at a small batch, activations at
# a large one, and every layer's activations kept when checkpointing is off.
CONFIGURATIONS = (
    Configuration(16, 1, 2048, True, "a 24 GB card's setting: weights and adapter dominate"),
    Configuration(64, 4, 2048, True, "recipes/mistral7b-alpaca.yaml's rank and batch: checkpointed activations grow"),
    Configuration(16, 1, 2048, False, "no gradient checkpointing: every layer's activations kept for backward"),
)


def configurations(shape: str) -> list[Configuration]:
    """The three configurations, with the row length of a small shape where one is set."""
    length = SHAPES[shape]["max_length"]
    return [dataclasses.replace(item, max_length=length or item.max_length) for item in CONFIGURATIONS]


def recipe_for(configuration: Configuration, base_dir: str, device: str, work_dir: str):
    """The recipe `qlora train` would run for one configuration: the schema's defaults (NF4, double quantization,
    LoRA on all linears, packing, paged AdamW 32-bit) with this configuration's rank, batch, length and checkpointing."""
    from qlora_cli.recipe import Recipe

    return Recipe.model_validate(
        {
            "model": {"id": base_dir, "device": device, "compute_dtype": "bfloat16" if device == "cuda" else "float32"},
            "lora": {"name": "plan-check", "r": configuration.r, "alpha": 2.0 * configuration.r},
            "data": {"path": "synthetic", "max_length": configuration.max_length},
            "train": {
                "output_dir": str(Path(work_dir) / "run"),
                "batch_size": configuration.batch_size,
                "grad_accum": 1,
                "max_steps": STEPS,
                "save_steps": STEPS + 1,
                "logging_steps": 1,
                "optim": "paged_adamw_32bit",
                "gradient_checkpointing": configuration.gradient_checkpointing,
                "report_to": [],
                "seed": SEED,
            },
        }
    )


def predict(recipe) -> dict:
    """plan.run's figures for a recipe, from its config.json alone (no torch)."""
    from qlora_cli import plan
    from qlora_cli.memory import predicted_max_allocated

    result = plan.run(recipe, gpu_memory_gb=None, tokens_per_second=None, dataset_tokens=None)
    return {
        "predicted_bytes": predicted_max_allocated(result.estimate),
        "predicted_total_bytes": result.estimate.total,
        "tokens_per_micro_batch": result.estimate.tokens_per_micro_batch,
        "components": {name: size for name, size, _ in plan.breakdown(result.estimate)},
    }


def write_config(shape: str, base_dir: Path) -> dict:
    """The shape's config.json and a tokenizer, without weights: enough for plan (and for a test on CPU)."""
    return save_base_config(base_dir, **SHAPES[shape]["config"])


def save_base(shape: str, device: str, base_dir: Path) -> None:
    """Random bf16 weights of the shape saved as safetensors beside the config (no download)."""
    model = build_base(base_dir, seed=SEED, device=device, **SHAPES[shape]["config"])
    del model
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def scratch_parent(needed_bytes: int) -> str | None:
    """Where to build the base: /dev/shm when it has room (memory, so saving and the three loads cost no disk
    time), else the default temporary folder."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > 1.5 * needed_bytes and os.access(shm, os.W_OK):
            return str(shm)
    except OSError:
        pass
    return None


def full_rows(count: int, max_length: int, vocab_size: int, bos_id: int, eos_id: int) -> list[dict]:
    """Tokenized examples of exactly max_length tokens, so that packing makes each one a full row; the first
    30% of each is prompt (labels -100), the rest and EOS are learned."""
    import numpy as np

    from qlora_cli.data import IGNORE_INDEX

    rng = np.random.default_rng(SEED)
    prompt = max(1, int(0.3 * max_length))
    rows = []
    for _ in range(count):
        body = rng.integers(eos_id + 1, vocab_size, max_length - 2).tolist()
        input_ids = [bos_id, *body, eos_id]
        rows.append({"input_ids": input_ids, "labels": [IGNORE_INDEX] * prompt + input_ids[prompt:]})
    return rows


def memory_recorder(cuda: bool, last_step: int):
    """A TrainerCallback that reads the allocator's peak at the end of each step and starts the next step's count,
    and keeps the trainer from saving a checkpoint after the last step (seconds of writing, nothing measured)."""
    import torch
    from transformers import TrainerCallback

    class MemoryRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.step_peaks: list[int] = []
            self.reserved_peaks: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                self.step_peaks.append(int(torch.cuda.max_memory_allocated()))
                self.reserved_peaks.append(int(torch.cuda.max_memory_reserved()))
                torch.cuda.reset_peak_memory_stats()
            if state.global_step >= last_step:
                control.should_save = False
            return control

    return MemoryRecorder()


def measure(recipe_data: dict) -> dict:
    """Runs in a fresh process: load the base in 4-bit, attach LoRA, train STEPS steps; the allocator's peaks."""
    import datasets
    import torch
    from transformers import AutoConfig, set_seed

    from qlora_cli.lora import attach_lora
    from qlora_cli.model import check_device, load_model, load_tokenizer
    from qlora_cli.recipe import Recipe
    from qlora_cli.train import CheckpointingTrainer, sft_config

    datasets.disable_progress_bars()
    recipe = Recipe.model_validate(recipe_data)
    device = check_device(recipe.model)
    cuda = device.type == "cuda"
    base_dir = Path(recipe.model.id)
    config = AutoConfig.from_pretrained(base_dir)
    tokenizer = load_tokenizer(base_dir, recipe.model)
    count = recipe.train.batch_size * (STEPS + 1)
    dataset = datasets.Dataset.from_list(
        full_rows(count, recipe.data.max_length, config.vocab_size, config.bos_token_id, config.eos_token_id)
    )
    started = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = load_model(recipe.model, base_dir, device=device)
    set_seed(recipe.train.seed)
    model = attach_lora(model, recipe.lora, gradient_checkpointing=recipe.train.gradient_checkpointing)
    trainer = CheckpointingTrainer(
        model=model,
        args=sft_config(recipe, use_cpu=not cuda),
        train_dataset=dataset,
        processing_class=tokenizer,
        save_limit=recipe.train.save_limit,
    )
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    recorder = memory_recorder(cuda, STEPS)
    trainer.add_callback(recorder)
    load_seconds = time.perf_counter() - started
    loaded = {"load_peak_bytes": None, "after_load_bytes": None}
    if cuda:
        torch.cuda.synchronize()
        loaded = {
            "load_peak_bytes": int(torch.cuda.max_memory_allocated()),
            "after_load_bytes": int(torch.cuda.memory_allocated()),
        }
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        **loaded,
        "measured_bytes": max(recorder.step_peaks) if recorder.step_peaks else None,
        "step_peak_bytes": recorder.step_peaks,
        "reserved_peak_bytes": max(recorder.reserved_peaks) if recorder.reserved_peaks else None,
        "paged_optimizer_bytes": paged_optimizer_bytes(trainer.optimizer) if cuda else None,
        "tokens_per_step": [batch.computed for batch in counter.batches[:STEPS]],
        "losses": losses,
        "steps": trainer.state.global_step,
        "liger_kernel": bool(trainer.args.use_liger_kernel),
        "padding_free": bool(getattr(trainer, "padding_free", False)),
        "load_seconds": round(load_seconds, 1),
        "train_seconds": round(train_seconds, 1),
    }


def measure_in_fresh_process(recipe, work_dir: Path, index: int) -> dict:
    """One configuration in its own process, so that its peak and its caches are its own."""
    spec = work_dir / f"config-{index}.json"
    spec.write_text(json.dumps(recipe.model_dump(mode="json")))
    try:
        return run_in_fresh_process("benchmarks.bench_plan", "worker", str(spec))
    except RuntimeError as error:
        return {"error": str(error)[-3000:]}


def compare(row: dict) -> dict:
    """The prediction's error relative to the measured peak, and whether it is within the target."""
    measured = row.get("measured_bytes")
    if not measured:
        return {**row, "error_share": None, "within_target": None}
    error = row["predicted_bytes"] / measured - 1
    return {**row, "error_share": error, "within_target": abs(error) <= TARGET_ERROR}


def run_measure(shape: str, device: str, json_path: Path | None = None) -> dict:
    """Build the base once, then predict and measure each configuration. The JSON is rewritten after each one,
    so that a run stopped by its time budget still leaves what it measured."""
    rows: list[dict] = []
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": shape,
        "device": device,
        "steps": STEPS,
        "target_error": TARGET_ERROR,
        "base_build_seconds": None,
        "command": f"python -m benchmarks.bench_plan measure --shape {shape}",
        "rows": rows,
    }
    with tempfile.TemporaryDirectory(
        prefix="qlora-plan-", dir=scratch_parent(15 * 10**9 if shape == "mistral7b" else 10**8)
    ) as scratch:
        base_dir = Path(scratch) / "base"
        log.info("building a random %s base in %s", shape, base_dir)
        started = time.perf_counter()
        save_base(shape, device, base_dir)
        report["base_build_seconds"] = round(time.perf_counter() - started, 1)
        for index, configuration in enumerate(configurations(shape)):
            work_dir = Path(scratch) / f"work-{index}"
            work_dir.mkdir()
            recipe = recipe_for(configuration, str(base_dir), device, str(work_dir))
            row = {"name": configuration.name, **dataclasses.asdict(configuration), **predict(recipe)}
            log.info(
                "%s: predicted %.2f GiB; training %d steps in a fresh process",
                configuration.name,
                row["predicted_bytes"] / GIB,
                STEPS,
            )
            row.update(measure_in_fresh_process(recipe, work_dir, index))
            rows.append(compare(row))
            if rows[-1].get("error"):
                log.error("%s failed: %s", configuration.name, rows[-1]["error"])
            shutil.rmtree(work_dir, ignore_errors=True)
            if json_path:
                json_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


# ------------------------------------------------------------------------------------------ tables


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def verdict(row: dict) -> str:
    if row.get("error"):
        return "failed"
    if row.get("within_target") is None:
        return "not measured (no CUDA)"
    return "yes" if row["within_target"] else "NO"


def plan_table_lines(report: dict) -> list[str]:
    """The plan-against-measured table as Markdown lines."""
    lines = [
        "| configuration | tokens/step | predicted GiB | measured GiB | error | within 10% | load peak GiB | reserved GiB | paged optimizer GiB |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for row in report["rows"]:
        error = "-" if row.get("error_share") is None else f"{100 * row['error_share']:+.1f}%"
        tokens = row.get("tokens_per_step") or [row["tokens_per_micro_batch"]]
        lines.append(
            f"| {row['name']} | {max(tokens):,} | {gib(row['predicted_bytes'])} | {gib(row.get('measured_bytes'))} | {error} | "
            f"{verdict(row)} | {gib(row.get('load_peak_bytes'))} | {gib(row.get('reserved_peak_bytes'))} | {gib(row.get('paged_optimizer_bytes'))} |"
        )
    return lines


def print_plan_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"qlora plan against torch.cuda.max_memory_allocated, {report['shape']} shape, {report['steps']} steps each"
    )
    for column in (
        "configuration",
        "tokens/step",
        "predicted GiB",
        "measured GiB",
        "error",
        f"within {TARGET_ERROR:.0%}",
    ):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for row in report["rows"]:
        error = "-" if row.get("error_share") is None else f"{100 * row['error_share']:+.1f}%"
        tokens = row.get("tokens_per_step") or [row["tokens_per_micro_batch"]]
        table.add_row(
            row["name"],
            f"{max(tokens):,}",
            gib(row["predicted_bytes"]),
            gib(row.get("measured_bytes")),
            error,
            verdict(row),
        )
    Console(width=None if sys.stdout.isatty() else 120).print(table)


# ------------------------------------------------------------------------------------------ report


def device_record() -> dict:
    """The GPU, its driver and CUDA, as nvidia-smi and torch see them; what is unknown stays None."""
    record: dict = {
        "gpu": None,
        "memory_gib": None,
        "driver": None,
        "compute_capability": None,
        "torch_cuda": None,
        "cuda_available": False,
    }
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            query = "--query-gpu=name,driver_version,memory.total,compute_cap"
            output = subprocess.run(
                [smi, query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20, check=True
            ).stdout
            name, driver, memory, capability = [part.strip() for part in output.splitlines()[0].split(",")][:4]
            record.update(
                gpu=name, driver=driver, memory_gib=round(float(memory) / 1024, 1), compute_capability=capability
            )
        except (subprocess.SubprocessError, OSError, ValueError, IndexError):
            pass
    try:
        import torch

        record["torch_cuda"] = torch.version.cuda
        record["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available() and record["gpu"] is None:
            properties = torch.cuda.get_device_properties(0)
            record.update(
                gpu=properties.name,
                memory_gib=round(properties.total_memory / GIB, 1),
                compute_capability=f"{properties.major}.{properties.minor}",
            )
    except Exception as error:  # a broken torch install is itself a finding for the report
        record["torch_error"] = f"{type(error).__name__}: {error}"
    return record


def read_steps(path: Path) -> list[dict]:
    """steps.tsv: name, exit code, seconds, budget in seconds, command; one line per step."""
    steps = []
    if not path.is_file():
        return steps
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 5:
            continue
        name, code, seconds, budget, command = parts[:5]
        steps.append(
            {
                "name": name,
                "exit_code": int(code) if code.lstrip("-").isdigit() else None,
                "seconds": int(seconds),
                "budget_seconds": int(budget),
                "command": command,
            }
        )
    return steps


def step_status(step: dict) -> str:
    code = step["exit_code"]
    if code is None:
        return "skipped"
    if code == 0:
        return "ok"
    if code in (124, 137):
        return f"TIMED OUT after {step['seconds']} s"
    return f"FAILED (exit {code})"


def read_tests(path: Path) -> list[dict]:
    """pytest's JUnit XML: each test's outcome, time, message and recorded properties."""
    if not path.is_file():
        return []
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:
        return []
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = (found.get("message") or found.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        properties = {item.get("name"): item.get("value") for item in case.iter("property")}
        tests.append(
            {
                "name": case.get("name"),
                "outcome": outcome,
                "seconds": round(float(case.get("time") or 0), 1),
                "message": message,
                "properties": properties,
            }
        )
    return tests


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def demote_headings(markdown: str) -> list[str]:
    """The benchmark's own Markdown report one heading level down, to sit inside BENCHMARKS.md."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        lines.append("#" + line if line.startswith("#") and not fenced else line)
    return lines


def build_report(work: Path, command: str, budget_seconds: int | None) -> dict:
    steps = read_steps(work / STEPS_TSV)
    for step in steps:
        if step["exit_code"] not in (0, None):
            step["log_tail"] = log_tail(work / f"{step['name']}.log")
    plan_report = read_json(work / PLAN_JSON)
    targets = []
    if plan_report:
        for row in plan_report["rows"]:
            if row.get("within_target") is not None:
                targets.append(
                    {
                        "target": f"plan within {TARGET_ERROR:.0%} of measured peak: {row['name']}",
                        "met": bool(row["within_target"]),
                        "value": f"{100 * row['error_share']:+.1f}%",
                    }
                )
    benchmark = read_json(work / BENCH_JSON)
    targets += benchmark_targets(benchmark)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "budget_seconds": budget_seconds,
        "seconds": sum(step["seconds"] for step in steps),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_record(),
        "versions": library_versions(LIBRARIES),
        "commit": git_commit(),
        "steps": steps,
        "tests": read_tests(work / PYTEST_XML),
        "plan_vs_measured": plan_report,
        "benchmark": benchmark,
        "targets": targets,
    }


def benchmark_targets(benchmark: dict | None) -> list[dict]:
    """The training benchmark's own targets, judged by its own code, when it ran on a GPU (on CPU they mean nothing)."""
    if not benchmark or benchmark.get("device") != "cuda":
        return []
    try:
        from benchmarks.bench import targets
    except ImportError:
        return []
    try:
        return [{"target": f"benchmark: {text}", "met": bool(met), "value": ""} for text, met in targets(benchmark)]
    except (KeyError, StopIteration, TypeError) as error:  # a partial JSON from a benchmark stopped by its budget
        return [
            {"target": f"benchmark: targets unreadable ({type(error).__name__}: {error})", "met": False, "value": ""}
        ]


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None


def render_report(report: dict, bench_markdown: str | None) -> str:
    device = report["device"]
    gpu = device["gpu"] or "no GPU"
    details = ", ".join(
        part
        for part in (
            f"{device['memory_gib']} GiB" if device["memory_gib"] else "",
            f"driver {device['driver']}" if device["driver"] else "",
            f"CUDA {device['torch_cuda']} (torch)" if device["torch_cuda"] else "",
            f"compute capability {device['compute_capability']}" if device["compute_capability"] else "",
        )
        if part
    )
    budget = f" of a {report['budget_seconds']} s budget" if report["budget_seconds"] else ""
    commit = f", commit {report['commit'][:12]}" if report["commit"] else ""
    lines = [
        "# GPU acceptance run",
        "",
        f"{report['date']} on **{gpu}**{f' ({details})' if details else ''}, Python {report['python']}: "
        f"{report['seconds']} s{budget}{commit}. Rerun with:",
        "",
        "```",
        "bash scripts/gpu-wheels.sh        # where PyPI is reachable: the wheels the GPU box lacks, into .whl/",
        report["command"] + "   # on the GPU box, with .whl/ beside the repo",
        "```",
        "",
        "Libraries: " + ", ".join(f"{name} {version}" for name, version in report["versions"].items()) + ".",
        "",
        "## Steps",
        "",
        "| step | result | seconds | budget s | command |",
        "|---|---|---:|---:|---|",
        *(
            f"| {step['name']} | {step_status(step)} | {step['seconds']} | {step['budget_seconds']} | `{step['command']}` |"
            for step in report["steps"]
        ),
        "",
    ]
    if report["targets"]:
        lines += ["## Targets", ""]
        lines += [
            f"- {'met' if target['met'] else 'NOT met'}: {target['target']}"
            + (f" ({target['value']})" if target["value"] else "")
            for target in report["targets"]
        ]
        lines.append("")
    if report["tests"]:
        lines += ["## GPU tests (`pytest -m gpu`)", "", "| test | outcome | seconds | measured |", "|---|---|---:|---|"]
        for test in report["tests"]:
            shown = [f"{key} {value}" for key, value in test["properties"].items()]
            if test["outcome"] != "passed" and test["message"]:
                shown.append(test["message"])
            measured = "; ".join(shown).replace("|", "/")
            lines.append(f"| {test['name']} | {test['outcome']} | {test['seconds']} | {measured} |")
        lines.append("")
    plan_report = report["plan_vs_measured"]
    if plan_report:
        lines += [
            "## Peak memory: `qlora plan` against `torch.cuda.max_memory_allocated`",
            "",
            f"The {plan_report['shape']} Mistral shape with random weights, 4-bit NF4 with double quantization, LoRA on every "
            f"linear layer, paged AdamW 32-bit, packing; {plan_report['steps']} optimizer steps per configuration, each in a fresh "
            "process, through qlora's own load_model, attach_lora, sft_config and CheckpointingTrainer. Predicted: "
            "`memory.predicted_max_allocated` (plan's total less the CUDA context, the allocator's slack and the paged optimizer "
            "state, which torch's allocator does not count). Measured: the largest per-step `torch.cuda.max_memory_allocated` "
            "after loading; the load's own peak, the allocator's reserved peak and the paged optimizer state are shown beside it.",
            "",
            *plan_table_lines(plan_report),
            "",
        ]
        for row in plan_report["rows"]:
            if row.get("error"):
                lines += [f"`{row['name']}` failed:", "", "```", row["error"][-1500:], "```", ""]
    if bench_markdown:
        lines += demote_headings(bench_markdown)
        lines.append("")
    failed = [step for step in report["steps"] if step["exit_code"] not in (0, None)]
    if failed:
        lines += ["## Failed steps: last lines of their output", ""]
        for step in failed:
            lines += [f"### {step['name']} ({step_status(step)})", "", "```", step.get("log_tail", ""), "```", ""]
    return "\n".join(lines)


def run_report(work: Path, out: Path, command: str, budget_seconds: int | None) -> int:
    report = build_report(work, command, budget_seconds)
    bench_markdown = (work / BENCH_MARKDOWN).read_text() if (work / BENCH_MARKDOWN).is_file() else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "BENCHMARKS.md").write_text(render_report(report, bench_markdown))
    failed = [step["name"] for step in report["steps"] if step["exit_code"] not in (0, None)]
    missed = [target["target"] for target in report["targets"] if not target["met"]]
    print(f"report: {out / 'BENCHMARKS.md'} and {out / 'gpu-check.json'}")
    for name in failed:
        print(f"step failed: {name}")
    for target in missed:
        print(f"target NOT met: {target}")
    return 4 if failed or missed else 0


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_plan", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    measure_parser = commands.add_parser("measure", help="predict and measure peak memory for three configurations")
    measure_parser.add_argument(
        "--shape", choices=SHAPES, help="model shape (default: mistral7b on CUDA, small on CPU)"
    )
    measure_parser.add_argument("--json", type=Path, help="write the results here")
    report_parser = commands.add_parser("report", help="BENCHMARKS.md and gpu-check.json from a gpu-check work folder")
    report_parser.add_argument(
        "work", type=Path, help="the folder scripts/gpu-check.sh wrote steps.tsv and the step outputs to"
    )
    report_parser.add_argument("--out", type=Path, required=True, help="folder for BENCHMARKS.md and gpu-check.json")
    report_parser.add_argument(
        "--command",
        dest="recorded_command",
        default="bash scripts/gpu-check.sh",
        help="the command that ran the check, as recorded",
    )
    report_parser.add_argument("--budget", type=int, help="the check's time budget in seconds, as recorded")
    worker_parser = commands.add_parser("worker")  # one configuration in a fresh process (internal)
    worker_parser.add_argument("spec", type=Path)
    worker_parser.add_argument("result", type=Path)
    args = parser.parse_args(argv)

    if args.command == "report":
        return run_report(args.work, args.out, args.recorded_command, args.budget)
    if args.command == "worker":
        args.result.write_text(json.dumps(measure(json.loads(args.spec.read_text()))))
        return 0

    import torch
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = args.shape or ("mistral7b" if device == "cuda" else "small")
    if device == "cpu" and shape == "mistral7b":
        parser.error("the mistral7b shape needs a CUDA GPU (7 B parameters); on CPU use --shape small")
    # A time budget ends this with SIGTERM: leave through the normal exit, so that the temporary base (14.5 GB,
    # perhaps in /dev/shm, that is memory) is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    report = run_measure(shape, device, args.json)
    print_plan_table(report)
    return 1 if any(row.get("error") for row in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
