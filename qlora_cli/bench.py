"""Benchmark: QLoRA training throughput and peak memory, qlora's defaults against the plain tutorial stack.

    python -m qlora_cli.bench                          # Mistral-7B shape on CUDA, a small shape on CPU
    python -m qlora_cli.bench --shape small --steps 4 --json bench.json --markdown BENCHMARKS.md

A Mistral-shaped base with random weights (no download) is saved once as bf16 safetensors; both arms
load it in 4-bit NF4 with double quantization and train LoRA on every linear layer of the same
synthetic data, on the same device, each in its own fresh process so that peak memory and caches
are its own:

  (a) plain: what tutorials do. transformers + bitsandbytes + peft + TRL's SFTTrainer with its default
      SFTConfig: no packing, each batch padded to its longest example, prepare_model_for_kbit_training
      + get_peft_model, gradient checkpointing on, default attention.
  (b) qlora: qlora's own model.load_model, lora.attach_lora, train.sft_config and CheckpointingTrainer:
      best-fit-decreasing packing, padding-free batches, liger kernels on CUDA when installed.

Both use batch size B and max_length L. Throughput counts only real tokens: padding a batch costs the
plain arm compute but teaches nothing. Examples have alpaca-like lengths (see `sample_lengths`).
"""

from __future__ import annotations

import qlora_cli  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import logging
import math
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from qlora_cli.bench_merge import proc_status_mib

log = logging.getLogger(__name__)

ARMS = {"plain": "(a) plain", "qlora": "(b) qlora"}
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "liger-kernel")
# Model shapes, and the run each is sized for. mistral7b is transformers.MistralConfig()'s defaults
# (d 4096, 32 layers, ffn 14336, 32/8 heads, vocab 32000); small runs in seconds per step on two CPU
# cores, with widths that are multiples of 32 because bitsandbytes packs 4-bit CPU weights in 32-row blocks.
SHAPES = {
    "mistral7b": {"config": {}, "max_length": 2048, "r": 64, "batch_size": 4, "steps": 20, "warmup": 3},
    "small": {
        "config": {"vocab_size": 1024, "hidden_size": 256, "intermediate_size": 640, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024},
        "max_length": 256, "r": 8, "batch_size": 8, "steps": 6, "warmup": 2,
    },
}
# Alpaca rendered in its template and tokenized with a Llama/Mistral tokenizer is heavily right-skewed:
# median ~150-200 tokens, a long tail to ~1k. Modelled as a lognormal with median 170 and sigma 0.6:
# mean ~200, p90 ~370, p99 ~690, one example in a thousand past ~1.1k. Lengths scale with max_length / 2048,
# so the small shape keeps the ratio of example length to row length that padding and packing
# efficiency depend on.
ALPACA_MEDIAN_TOKENS = 170
ALPACA_SIGMA = 0.6
ALPACA_MAX_LENGTH = 2048
MIN_TOKENS = 4  # BOS, one prompt token, one response token, EOS
PROMPT_SHARE = (0.2, 0.6)  # prompt (template + instruction + input) share of each example, uniform
# Targets for (b) against (a), checked on CUDA: a padded, unpacked stack wastes compute on padding.
TARGET_SPEEDUP = 2.0
TARGET_MEMORY_RATIO = 0.6
TARGET_CEILING_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class Settings:
    shape: str
    steps: int  # measured optimizer steps, after the warm-up ones
    warmup: int
    batch_size: int
    max_length: int
    r: int
    seed: int
    device: str  # "cuda" or "cpu"
    base_dir: str
    work_dir: str

    @property
    def compute_dtype(self) -> str:
        # CPUs without bf16 units run fp32 faster (the same reason the tiny CPU recipes use float32).
        return "bfloat16" if self.device == "cuda" else "float32"

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


# ---------------------------------------------------------------------------------------------- data


def sample_lengths(count: int, max_length: int, seed: int) -> list[int]:
    """Example lengths in tokens (EOS included): lognormal, alpaca-like, scaled to max_length, clipped to it."""
    import numpy as np

    median = ALPACA_MEDIAN_TOKENS * max_length / ALPACA_MAX_LENGTH
    draws = np.random.default_rng(seed).lognormal(math.log(median), ALPACA_SIGMA, count)
    return np.clip(np.rint(draws), MIN_TOKENS, max_length).astype(int).tolist()


def synthetic_examples(count: int, settings: Settings, vocab_size: int, bos_id: int, eos_id: int) -> list[dict]:
    """Tokenized examples with random token ids: prompt masked from the loss (-100), response and EOS learned."""
    import numpy as np

    from qlora_cli.data import IGNORE_INDEX

    rng = np.random.default_rng(settings.seed + 1)
    examples = []
    for length in sample_lengths(count, settings.max_length, settings.seed):
        prompt = max(2, round(length * rng.uniform(*PROMPT_SHARE)))
        prompt = min(prompt, length - 2)  # leave a response token before EOS
        body = rng.integers(eos_id + 1, vocab_size, length - 2).tolist()
        input_ids = [bos_id, *body, eos_id]
        labels = [IGNORE_INDEX] * prompt + input_ids[prompt:]
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def examples_needed(settings: Settings) -> int:
    """Enough examples that the packed arm (about max_length / mean length examples per row) never runs
    out within the run; the padded arm uses a fraction of them."""
    mean = ALPACA_MEDIAN_TOKENS * settings.max_length / ALPACA_MAX_LENGTH * math.exp(ALPACA_SIGMA**2 / 2)
    return math.ceil(1.2 * settings.total_steps * settings.batch_size * settings.max_length / mean)


def length_summary(lengths: list[int]) -> dict:
    ordered = sorted(lengths)

    def quantile(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "examples": len(ordered), "mean": round(sum(ordered) / len(ordered), 1), "median": quantile(0.5),
        "p90": quantile(0.9), "p99": quantile(0.99), "max": ordered[-1],
    }


def real_tokens(batch: dict) -> tuple[int, int]:
    """(real, computed) tokens of one collated batch. Padded batches mark real tokens in attention_mask;
    padding-free batches are one row of real tokens (TRL pads them only with pad_to_multiple_of, unset here)."""
    computed = batch["input_ids"].numel()
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum()), computed
    return computed, computed


# -------------------------------------------------------------------------------------------- models


def build_base(settings: Settings) -> dict:
    """A random Mistral-shaped base saved as bf16 safetensors with a tokenizer; returns its config."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig
    from transformers.utils import logging as transformers_logging

    from qlora_cli.demo.pretrain import build_tokenizer

    transformers_logging.disable_progress_bar()

    tokenizer = build_tokenizer([])  # only its special tokens matter: the data is token ids already
    config = MistralConfig(
        **SHAPES[settings.shape]["config"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    torch.manual_seed(settings.seed)
    # Initialising 7B parameters takes seconds on a GPU and minutes on CPU cores.
    with torch.device(settings.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(settings.base_dir)
    tokenizer.model_max_length = settings.max_length
    tokenizer.save_pretrained(settings.base_dir)
    del model
    if settings.device == "cuda":
        torch.cuda.empty_cache()
    return config.to_dict()


def qlora_recipe(settings: Settings):
    from qlora_cli.recipe import Recipe

    return Recipe.model_validate({
        "model": {"id": settings.base_dir, "compute_dtype": settings.compute_dtype, "device": settings.device},
        "lora": {"name": "bench", "r": settings.r, "alpha": 2.0 * settings.r},
        "data": {"path": "synthetic", "max_length": settings.max_length},
        "train": {
            "output_dir": str(Path(settings.work_dir) / "qlora-run"),
            "batch_size": settings.batch_size,
            "grad_accum": 1,  # one micro-step per optimizer step in both arms, so a step means the same work
            "max_steps": settings.total_steps,
            "save_steps": settings.total_steps + 1,  # no checkpoint inside the timed run, as in the plain arm
        },
    })


def plain_trainer(settings: Settings, dataset):
    """The tutorial recipe: each library's defaults, plus the batch size and length both arms share."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    dtype = getattr(torch, settings.compute_dtype)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        settings.base_dir, quantization_config=quantization, dtype=dtype, device_map="auto" if settings.device == "cuda" else None
    )
    model = prepare_model_for_kbit_training(model)
    lora = LoraConfig(r=settings.r, lora_alpha=2 * settings.r, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    tokenizer = AutoTokenizer.from_pretrained(settings.base_dir)
    cpu = settings.device == "cpu"
    args = SFTConfig(
        output_dir=str(Path(settings.work_dir) / "plain-run"),
        per_device_train_batch_size=settings.batch_size,
        max_length=settings.max_length,
        max_steps=settings.total_steps,
        seed=settings.seed,
        save_strategy="no",
        report_to="none",
        use_cpu=cpu,
        bf16=not cpu,  # SFTConfig's default; on CPU both arms compute in fp32
    )
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def qlora_trainer(settings: Settings, dataset):
    """qlora's defaults, built by the same functions `qlora train` calls."""
    from transformers import set_seed

    from qlora_cli.lora import attach_lora
    from qlora_cli.model import check_device, load_model, load_tokenizer
    from qlora_cli.train import CheckpointingTrainer, sft_config

    recipe = qlora_recipe(settings)
    device = check_device(recipe.model)
    tokenizer = load_tokenizer(Path(settings.base_dir), recipe.model)
    model = load_model(recipe.model, Path(settings.base_dir), device=device)
    set_seed(settings.seed)
    model = attach_lora(model, recipe.lora, gradient_checkpointing=recipe.train.gradient_checkpointing)
    args = sft_config(recipe, use_cpu=device.type == "cpu")
    trainer = CheckpointingTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    # The trainer saves a last checkpoint when max_steps is reached, after the timed steps, as in `qlora train`.
    trainer.qlora_save_limit = recipe.train.save_limit
    return trainer


# ----------------------------------------------------------------------------------------- measuring


class TokenCounter:
    """Wraps the trainer's collator and records each batch's real and computed tokens, in the order the
    dataloader asks for them: the n-th batch collated is the n-th step's (one micro-step per step), even
    when the loader prefetches a batch ahead."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[tuple[int, int]] = []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.batches.append(real_tokens(batch))
        return batch


def step_timer(synchronize):
    """A TrainerCallback recording when each optimizer step ends; a step's time is the gap to the previous
    end (or to the start of training), so it covers data loading, forward, backward and the optimizer."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize()  # CUDA runs asynchronously: wait for the step's kernels before reading the clock
            self.ends.append(time.perf_counter())

        def step_seconds(self) -> list[float]:
            return [end - previous for previous, end in zip([self.start, *self.ends], self.ends)]

    return StepTimer()


def reset_peak_memory(device: str) -> float:
    """Start counting peak memory here; returns the baseline to subtract (bytes)."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    # Writing 5 resets the kernel's peak-RSS counter (VmHWM), so the import spike does not count.
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_mib("VmRSS") * 2**20


def peak_memory(device: str, baseline: float) -> float:
    import torch

    if device == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return proc_status_mib("VmHWM") * 2**20 - baseline


def paged_optimizer_bytes(optimizer) -> int:
    """Optimizer state in bitsandbytes' paged buffers: CUDA managed memory, which torch's allocator (and so
    max_memory_allocated) never sees, though it occupies the GPU like any other tensor until paged out."""
    import torch

    return sum(
        value.nbytes
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and getattr(value, "is_paged", False)
    )


def measure_arm(arm: str, settings: Settings) -> dict:
    """Runs in a fresh process: load, attach LoRA, train warmup + steps steps, and report."""
    import datasets
    import torch
    from transformers import AutoConfig

    datasets.disable_progress_bars()
    synchronize = torch.cuda.synchronize if settings.device == "cuda" else (lambda: None)
    config = AutoConfig.from_pretrained(settings.base_dir)
    dataset = datasets.Dataset.from_list(
        synthetic_examples(examples_needed(settings), settings, config.vocab_size, config.bos_token_id, config.eos_token_id)
    )
    baseline = reset_peak_memory(settings.device)
    trainer = (plain_trainer if arm == "plain" else qlora_trainer)(settings, dataset)
    counter, timer = TokenCounter(trainer.data_collator), step_timer(synchronize)
    trainer.data_collator = counter
    trainer.add_callback(timer)
    trainer.train()

    seconds = timer.step_seconds()
    if len(seconds) != settings.total_steps or len(counter.batches) < settings.total_steps:
        raise RuntimeError(f"{arm}: {len(seconds)} steps timed and {len(counter.batches)} batches counted; expected {settings.total_steps}")
    measured = slice(settings.warmup, settings.total_steps)
    real = sum(batch[0] for batch in counter.batches[measured])
    computed = sum(batch[1] for batch in counter.batches[measured])
    elapsed = sum(seconds[measured])
    allocator_peak = peak_memory(settings.device, baseline)
    # On CPU bitsandbytes falls back to ordinary buffers, which the peak RSS already counts.
    paged = paged_optimizer_bytes(trainer.optimizer) if settings.device == "cuda" else 0
    return {
        "arm": arm,
        "tokens_per_second": real / elapsed,
        "step_seconds": elapsed / settings.steps,
        "real_tokens_per_step": real / settings.steps,
        "padding_share": 1 - real / computed,
        "peak_memory_bytes": allocator_peak + paged,
        "allocator_peak_bytes": allocator_peak,
        "paged_optimizer_bytes": paged,
        "step_seconds_all": [round(value, 4) for value in seconds],
        "liger_kernel": bool(trainer.args.use_liger_kernel),
        "packing": bool(trainer.args.packing),
        "padding_free": bool(trainer.padding_free),
    }


def run_in_fresh_process(arm: str, settings: Settings) -> dict:
    spec = Path(settings.work_dir) / f"{arm}-settings.json"
    result = Path(settings.work_dir) / f"{arm}-result.json"
    spec.write_text(json.dumps(dataclasses.asdict(settings)))
    command = [sys.executable, "-m", "qlora_cli.bench", "--worker", arm, str(spec), str(result)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"arm {arm} failed (exit {completed.returncode}):\n{(completed.stdout + completed.stderr)[-6000:]}")
    return json.loads(result.read_text())


def matmul_peak_flops(device: str) -> float:
    """Dense matmul rate in the arms' compute dtype: the ceiling the training FLOPs are measured against.
    On an H100 this gives about 790 TFLOP/s (bf16), the figure ANCHORS.md uses."""
    import torch

    size, repeats = (8192, 20) if device == "cuda" else (1024, 10)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


# ------------------------------------------------------------------------------------------ reporting


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    return f"{models[0] if models else platform.processor() or 'CPU'}, {len(models) or '?'} cores (CPU)"


def flops_text(value: float) -> str:
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,.0f} FLOP"


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def summarise(rows: list[dict], flops_per_token: float, peak_flops: float) -> None:
    """Adds the ratios against arm (a) and the share of the compute ceiling to each row."""
    plain = rows[0]
    for row in rows:
        row["speedup"] = row["tokens_per_second"] / plain["tokens_per_second"]
        row["memory_ratio"] = row["peak_memory_bytes"] / plain["peak_memory_bytes"]
        row["ceiling_share"] = row["tokens_per_second"] * flops_per_token / peak_flops


def targets(report: dict) -> list[tuple[str, bool]]:
    qlora = report["rows"][1]
    return [
        (f"tokens/s >= {TARGET_SPEEDUP:.1f}x (a): {qlora['speedup']:.2f}x", qlora["speedup"] >= TARGET_SPEEDUP),
        (f"peak memory <= {TARGET_MEMORY_RATIO:.1f}x (a): {qlora['memory_ratio']:.2f}x", qlora["memory_ratio"] <= TARGET_MEMORY_RATIO),
        (f">= {100 * TARGET_CEILING_SHARE:.0f}% of the compute ceiling: {100 * qlora['ceiling_share']:.1f}%",
         qlora["ceiling_share"] >= TARGET_CEILING_SHARE),
    ]


def table_rows(report: dict) -> list[list[str]]:
    return [
        [
            ARMS[row["arm"]],
            f"{row['tokens_per_second']:,.0f}",
            f"{row['speedup']:.2f}x",
            f"{row['step_seconds']:.3f}",
            f"{row['real_tokens_per_step']:,.0f}",
            f"{100 * row['padding_share']:.0f}%",
            f"{row['peak_memory_bytes'] / 2**30:.2f}",
            f"{row['memory_ratio']:.2f}x",
            f"{100 * row['ceiling_share']:.1f}%",
        ]
        for row in report["rows"]
    ]


def table_columns(report: dict) -> list[str]:
    memory = "peak GPU GiB" if report["device"] == "cuda" else "peak RSS+ GiB"
    return ["arm", "tokens/s", "speed-up", "step s", "tokens/step", "padding", memory, "memory vs (a)", "% of ceiling"]


def render_table(report: dict) -> Table:
    settings = report["settings"]
    table = Table(
        title=f"QLoRA training, {settings['shape']} shape, batch {settings['batch_size']} x {settings['max_length']} tokens, "
        f"LoRA r={settings['r']}, {settings['steps']} steps after {settings['warmup']} warm-up",
        caption=f"tokens: real (non-padding) tokens. {report['device_name']}; ceiling: {flops_text(report['peak_flops'])}/s "
        f"at {flops_text(report['flops_per_token'])}/token; memory: {report['memory_kind']}",
    )
    for column in table_columns(report):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for row in table_rows(report):
        table.add_row(*row)
    return table


def render_markdown(report: dict) -> str:
    settings, lengths = report["settings"], report["lengths"]
    columns = table_columns(report)
    lines = [
        "# Training benchmark: qlora defaults against the plain transformers + peft + TRL stack",
        "",
        f"Measured {report['date']} on **{report['device_name']}**. Rerun with:",
        "",
        "```",
        report["command"],
        "```",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if column == "arm" else "---:" for column in columns) + "|",
        *("| " + " | ".join(row) + " |" for row in table_rows(report)),
        "",
    ]
    if report["device"] == "cuda":
        lines += ["Targets for (b):", ""]
        lines += [f"- {'met' if met else 'NOT met'}: {text}" for text, met in targets(report)]
        lines.append("")
    plain, qlora = report["rows"]
    lines += [
        "## What ran",
        "",
        f"- Base: `{settings['shape']}` Mistral shape with random weights ({report['parameters'] / 1e6:,.1f} M parameters), "
        f"saved as bf16 safetensors, loaded in 4-bit NF4 with double quantization, {settings['compute_dtype']} compute.",
        f"- LoRA r={settings['r']}, alpha {2 * settings['r']}, dropout 0.05 on every linear layer; gradient checkpointing "
        f"on in both arms; batch size {settings['batch_size']}, max_length {settings['max_length']}, one micro-step per "
        f"optimizer step; {settings['warmup']} warm-up steps, then {settings['steps']} measured. Each arm in a fresh process.",
        "- (a) plain: `prepare_model_for_kbit_training` + `get_peft_model`, TRL `SFTTrainer` with default `SFTConfig` "
        f"(packing {plain['packing']}, padding-free {plain['padding_free']}, liger {plain['liger_kernel']}), default attention.",
        "- (b) qlora: `model.load_model`, `lora.attach_lora`, `train.sft_config`, `train.CheckpointingTrainer` "
        f"(packing {qlora['packing']}, padding-free {qlora['padding_free']}, liger {qlora['liger_kernel']}).",
        "- (a) is transformers + bitsandbytes + peft + TRL as tutorials use them; (b) is what `qlora train` runs.",
        "- tokens/s and tokens/step count real (non-padding) tokens only; padding is the share of computed tokens that were padding. "
        "(b) packs up to batch x max_length tokens per step, so its steps are longer and hold more tokens, and activations, than (a)'s padded batches.",
        f"- Memory: {report['memory_kind']}.",
        f"- Compute ceiling: {flops_text(report['flops_per_token'])} per token (`plan.flops_per_token`, with checkpointing) "
        f"against {flops_text(report['peak_flops'])}/s ({report['peak_flops_source']}).",
        "",
        "## Data",
        "",
        f"{lengths['examples']:,} synthetic examples of random token ids. Lengths (EOS included) are lognormal with median "
        f"{ALPACA_MEDIAN_TOKENS} x max_length/{ALPACA_MAX_LENGTH} tokens and sigma {ALPACA_SIGMA}, like alpaca rendered in "
        f"its template and tokenized with a Llama/Mistral tokenizer (median ~150-200 tokens, a long tail to ~1k), clipped to [{MIN_TOKENS}, max_length]; the prompt is "
        f"{PROMPT_SHARE[0]:.0%}-{PROMPT_SHARE[1]:.0%} of each example and masked from the loss (labels -100), the response "
        f"and EOS are learned. Sampled: mean {lengths['mean']}, median {lengths['median']}, p90 {lengths['p90']}, "
        f"p99 {lengths['p99']}, max {lengths['max']} tokens (seed {settings['seed']}).",
        "",
        "## Versions",
        "",
        f"Python {platform.python_version()}; " + ", ".join(f"{name} {version}" for name, version in report["versions"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def rerun_command(args: argparse.Namespace) -> str:
    command = ["python", "-m", "qlora_cli.bench", "--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--r", str(args.r), "--seed", str(args.seed)]
    if args.peak_tflops:
        command += ["--peak-tflops", str(args.peak_tflops)]
    for flag in ("json", "markdown"):
        if getattr(args, flag):
            command += [f"--{flag}", str(getattr(args, flag))]
    return shlex.join(command)


def run(args: argparse.Namespace, device: str) -> dict:
    from qlora_cli.plan import count_parameters, flops_per_token

    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as scratch:
        settings = Settings(
            shape=args.shape, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, max_length=args.max_length,
            r=args.r, seed=args.seed, device=device, base_dir=str(Path(scratch) / "base"), work_dir=scratch,
        )
        log.info("building a random %s base in %s", args.shape, settings.base_dir)
        config = build_base(settings)
        if args.peak_tflops:
            peak_flops, peak_source = args.peak_tflops * 1e12, "stated with --peak-tflops"
        else:
            peak_flops = matmul_peak_flops(device)
            peak_source = f"measured: dense {'bf16 8192' if device == 'cuda' else 'fp32 1024'}-square matmuls on this device"
        rows = []
        for arm, label in ARMS.items():
            log.info("%s: loading in 4-bit and training %d steps in a fresh process", label, settings.total_steps)
            rows.append(run_in_fresh_process(arm, settings))
            log.info("%s: %.0f real tokens/s", label, rows[-1]["tokens_per_second"])
    per_token = flops_per_token(config, qlora_recipe(settings))
    summarise(rows, per_token, peak_flops)
    return {
        "date": datetime.date.today().isoformat(),
        "command": rerun_command(args),
        "device": device,
        "device_name": device_name(device),
        "settings": {**dataclasses.asdict(settings), "compute_dtype": settings.compute_dtype},
        "parameters": count_parameters(config)["total"],
        "lengths": length_summary(sample_lengths(examples_needed(settings), settings.max_length, settings.seed)),
        "flops_per_token": per_token,
        "peak_flops": peak_flops,
        "peak_flops_source": peak_source,
        "memory_kind": "torch.cuda.max_memory_allocated() since before loading the model, plus bitsandbytes' paged "
        "optimizer state (CUDA managed memory, outside torch's allocator)" if device == "cuda"
        else "growth of peak RSS (VmHWM, reset before loading the model) over the RSS after imports",
        "versions": library_versions(),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qlora_cli.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, help="model shape (default: mistral7b on CUDA, small on CPU)")
    parser.add_argument("--steps", type=int, help="measured optimizer steps per arm, after the warm-up (default: per shape)")
    parser.add_argument("--warmup", type=int, help="steps run before measuring: allocator, kernels and caches settle (default: per shape)")
    parser.add_argument("--batch-size", type=int, help="examples (a) or packed rows (b) per step (default: per shape)")
    parser.add_argument("--max-length", type=int, help="max_length in tokens (default: 2048 for mistral7b, 256 for small)")
    parser.add_argument("--r", type=int, help="LoRA rank (default: 64 for mistral7b, 8 for small)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s for the ceiling (default: measured with a matmul)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--markdown", type=Path, help="write a report here, e.g. BENCHMARKS.md")
    parser.add_argument("--worker", nargs=3, metavar=("ARM", "SETTINGS", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        arm, spec, result = args.worker
        measured = measure_arm(arm, Settings(**json.loads(Path(spec).read_text())))
        Path(result).write_text(json.dumps(measured))
        return

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.shape = args.shape or ("mistral7b" if device == "cuda" else "small")
    for key in ("steps", "warmup", "batch_size", "max_length", "r"):
        if getattr(args, key) is None:
            setattr(args, key, SHAPES[args.shape][key])
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1: the first step also pays for setup")
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])

    report = run(args, device)
    console = Console(width=None if sys.stdout.isatty() else 120)  # rich assumes 80 columns when piped
    console.print(render_table(report))
    if device == "cuda":
        for text, met in targets(report):
            console.print(f"[{'green' if met else 'red'}]{'met' if met else 'NOT met'}[/]: {text}")
    else:
        console.print("Targets (2x tokens/s, 0.6x memory, 50% of ceiling) are for an H100; on CPU the table only shows the script works.")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(render_markdown(report))


if __name__ == "__main__":
    main()
