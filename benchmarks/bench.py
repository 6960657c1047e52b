"""Benchmark: QLoRA training, three stacks on the same examples: real tokens/s, peak memory, MFU and HFU.

    python -m benchmarks.bench                          # Mistral-7B shape on CUDA, a small shape on CPU
    python -m benchmarks.bench --shape small --steps 4 --json bench.json --markdown BENCHMARKS.md

A Mistral-shaped base with random weights (no download) is saved once as bf16 safetensors. Every arm loads
it in 4-bit NF4 with double quantization, attaches the same LoRA (rank r, alpha 2r, dropout 0.05, every
linear layer but the LM head) and trains one epoch over the same fixed set of synthetic examples, on the
same device, each in its own fresh process so that peak memory and caches are its own:

  (a) tutorial: the QLoRA tutorial stack, with the settings the 2023 QLoRA tutorials share (the notebooks
      of HF's "Making LLMs even more accessible with bitsandbytes, 4-bit quantization and QLoRA" post, the
      Falcon-7B guanaco example, artidoro/qlora): `prepare_model_for_kbit_training` + `get_peft_model`,
      TRL's SFTTrainer with
        per_device_train_batch_size 4, gradient_accumulation_steps 4 (16 examples per optimizer step: the
        Falcon-7B example's; the others use 1 x 4 or 1 x 16), optim paged_adamw_32bit, learning_rate 2e-4,
        lr_scheduler_type constant, warmup ratio 0.03, max_grad_norm 0.3, bf16, gradient checkpointing on,
        max_length 2048 (the shape's --max-length), no packing, no padding-free batches: each batch padded
        to its longest example, random sampler (group_by_length off; tutorials that turn it on pad less),
        default (sdpa) attention.
  (b) TRL defaults: the same model load and LoRA, TRL's `SFTConfig()` as installed, except that it trains
      one epoch (its default is 3) and saves nothing: batch 8, no accumulation, max_length 1024, bf16,
      gradient checkpointing, adamw_torch_fused, lr 2e-5 linear, no packing (padded batches).
  (c) qlora: qlora's own model.load_model, lora.attach_lora, train.sft_config and CheckpointingTrainer with
      the recipe schema's defaults (today batch 4 x accumulation 4 at the shape's max_length, best-fit-
      decreasing packing into padding-free rows, paged AdamW 32-bit, liger kernels on CUDA when installed).

On CPU every arm computes in fp32 (CPUs without bf16 units run it faster); the small shape takes minutes
there, the one-layer tiny shape seconds (a smoke test). --batch-size overrides every arm's micro-batch,
for quick runs only.

Same examples, epoch-shaped: the examples are identical in every arm (checked: each arm fingerprints the
token ids its collator saw and must match the data set; its real tokens must sum to the data set's), and
their lengths are capped at the smallest max_length of the three arms, so nothing is truncated. Throughput
counts real (non-padding) tokens over the wall time of every optimizer step after the first --warmup ones
(allocator, kernels and optimizer state settle there); tokens per optimizer step differ by design and are
shown beside each arm.

FLOPs: MFU counts the model FLOPs of the real tokens only: forward (frozen linears, LoRA, LM head, causal
attention over each example's own prefix) and backward without base weight gradients (input gradients of
frozen weights, both LoRA gradients, attention backward 2x its forward); no recompute, no padding. HFU
counts what the hardware ran: every computed token (padding included), the recompute of checkpointed
layers, and causal attention over each computed row (a padded row, or a padding-free row taken as one
sequence unless the attention kernel is varlen flash). Both are divided by a measured dense-matmul peak.
"""

from __future__ import annotations

import qlora_cli  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

# isort: split

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from benchmarks.bench_merge import proc_status_mib
from qlora_cli.adapters import library_versions
from qlora_cli.testing import SMALL_SHAPE, build_base, run_in_fresh_process

log = logging.getLogger(__name__)

ARMS = {"tutorial": "(a) tutorial", "trl": "(b) TRL defaults", "qlora": "(c) qlora"}
LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "liger-kernel")
# Model shapes, and the run each is sized for: `steps` measured optimizer steps of arm (c), the arm with the
# most tokens per step, after `warmup` ones; the example set is sized to that, and the other arms take more,
# smaller steps over the same examples. mistral7b is transformers.MistralConfig()'s defaults (d 4096, 32
# layers, ffn 14336, 32/8 heads, vocab 32000); small (testing.SMALL_SHAPE) runs in minutes on two CPU cores.
SHAPES = {
    "mistral7b": {"config": {}, "max_length": 2048, "r": 64, "steps": 6, "warmup": 1},
    "small": {
        "config": SMALL_SHAPE,
        "max_length": 256,
        "r": 8,
        "steps": 4,
        "warmup": 1,
    },
    # One layer: a smoke test of the whole benchmark in seconds (the test suite runs it); its figures mean nothing.
    "tiny": {
        "config": {
            "vocab": 256,
            "hidden": 64,
            "intermediate": 128,
            "layers": 1,
            "heads": 2,
            "kv_heads": 1,
            "max_positions": 256,
        },
        "max_length": 64,
        "r": 4,
        "steps": 1,
        "warmup": 1,
    },
}
# The tutorial stack's settings (see the module docstring); max_length and bf16 come from the shape and device.
TUTORIAL = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "optim": "paged_adamw_32bit",
    "learning_rate": 2e-4,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0.03,  # transformers reads a float below 1 as a share of all steps (the tutorials' warmup_ratio)
    "max_grad_norm": 0.3,
    "activation_checkpointing": True,  # transformers 5's name for gradient_checkpointing
    "packing": False,
    "padding_free": False,
    "train_sampling_strategy": "random",  # group_by_length off
}
LORA_DROPOUT = 0.05
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
# Targets for (c) against (a), checked on an H100/H200 and reported, never asserted.
TARGET_SPEEDUP = 2.0
TARGET_MEMORY_RATIO = 0.6
TARGET_MFU = 0.4


@dataclasses.dataclass(frozen=True)
class Settings:
    shape: str
    examples: int  # the epoch: every arm trains one pass over these
    length_cap: int  # longest example in tokens: the smallest max_length of the three arms
    warmup: int  # optimizer steps per arm before the clock starts
    batch_size: int | None  # micro-batch override for every arm; None: each arm's own
    max_length: int  # max_length of arms (a) and (c); examples scale with it
    r: int
    seed: int
    device: str  # "cuda" or "cpu"
    base_dir: str
    work_dir: str

    @property
    def compute_dtype(self) -> str:
        # CPUs without bf16 units run fp32 faster (the same reason the tiny CPU recipes use float32).
        return "bfloat16" if self.device == "cuda" else "float32"


# ---------------------------------------------------------------------------------------------- data


def sample_lengths(count: int, max_length: int, seed: int, cap: int | None = None) -> list[int]:
    """Example lengths in tokens (EOS included): lognormal, alpaca-like, scaled to max_length, clipped to
    [MIN_TOKENS, cap] (cap defaults to max_length)."""
    import numpy as np

    median = ALPACA_MEDIAN_TOKENS * max_length / ALPACA_MAX_LENGTH
    draws = np.random.default_rng(seed).lognormal(math.log(median), ALPACA_SIGMA, count)
    return np.clip(np.rint(draws), MIN_TOKENS, cap or max_length).astype(int).tolist()


def synthetic_examples(settings: Settings, vocab_size: int, bos_id: int, eos_id: int) -> list[dict]:
    """The epoch: settings.examples tokenized examples of random token ids, the prompt masked from the loss
    (-100), response and EOS learned. Seeded, so every arm's process builds the same list."""
    import numpy as np

    from qlora_cli.data import IGNORE_INDEX

    rng = np.random.default_rng(settings.seed + 1)
    examples = []
    for length in sample_lengths(settings.examples, settings.max_length, settings.seed, settings.length_cap):
        prompt = max(2, round(length * rng.uniform(*PROMPT_SHARE)))
        prompt = min(prompt, length - 2)  # leave a response token before EOS
        body = rng.integers(eos_id + 1, vocab_size, length - 2).tolist()
        input_ids = [bos_id, *body, eos_id]
        labels = [IGNORE_INDEX] * prompt + input_ids[prompt:]
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def examples_for_steps(steps: int, warmup: int, tokens_per_step: int, max_length: int) -> int:
    """Examples that fill about warmup + steps optimizer steps of tokens_per_step tokens (arm (c)'s packed
    rows); packing leaves a little room in each row, so (c) may take one step more."""
    mean = ALPACA_MEDIAN_TOKENS * max_length / ALPACA_MAX_LENGTH * math.exp(ALPACA_SIGMA**2 / 2)
    return math.ceil((warmup + steps) * tokens_per_step / mean)


def length_summary(lengths: list[int]) -> dict:
    ordered = sorted(lengths)

    def quantile(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "examples": len(ordered),
        "tokens": sum(ordered),
        "mean": round(sum(ordered) / len(ordered), 1),
        "median": quantile(0.5),
        "p90": quantile(0.9),
        "p99": quantile(0.99),
        "max": ordered[-1],
    }


def example_digest(token_ids) -> str:
    """One example's identity: its token ids as little-endian int64 bytes."""
    import numpy as np

    return hashlib.sha256(np.asarray(token_ids, dtype="<i8").tobytes()).hexdigest()


def examples_fingerprint(digests: list[str]) -> str:
    """The identity of a set of examples, whatever order, batching or packing they arrived in."""
    return "sha256:" + hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()[:32]


def causal_pairs(length: int) -> int:
    """(query, key) pairs causal attention computes over a sequence of `length` tokens."""
    return length * (length + 1) // 2


@dataclasses.dataclass(frozen=True)
class BatchRecord:
    """What one collated micro-batch holds: real tokens are the examples' own, computed ones include padding."""

    examples: tuple[int, ...]  # each example's length in tokens
    rows: tuple[int, ...]  # each computed row's length: padded rows, or one padding-free row
    digests: tuple[str, ...]  # each example's example_digest

    @property
    def real(self) -> int:
        return sum(self.examples)

    @property
    def computed(self) -> int:
        return sum(self.rows)


def describe_batch(batch: dict) -> BatchRecord:
    """Padded batches mark real tokens in attention_mask (TRL pads on the right); padding-free batches are one
    row of examples laid end to end, each starting at position id 0 (TRL pads them only with
    pad_to_multiple_of, unset in every arm)."""
    input_ids = batch["input_ids"]
    if "attention_mask" in batch:
        mask = batch["attention_mask"].bool()
        examples = [row[keep] for row, keep in zip(input_ids, mask)]
        rows = [input_ids.shape[1]] * input_ids.shape[0]
    else:
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        flat = input_ids[0]
        examples = [flat[start:end] for start, end in zip(starts, [*starts[1:], flat.numel()])]
        rows = [flat.numel()]
    return BatchRecord(
        examples=tuple(int(example.numel()) for example in examples),
        rows=tuple(rows),
        digests=tuple(example_digest(example.cpu().numpy()) for example in examples),
    )


# -------------------------------------------------------------------------------------------- models


def save_base(settings: Settings) -> dict:
    """A random Mistral-shaped base saved as bf16 safetensors with a tokenizer; returns its config."""
    model = build_base(
        Path(settings.base_dir),
        seed=settings.seed,
        device=settings.device,
        max_length=settings.max_length,
        **SHAPES[settings.shape]["config"],
    )
    config = model.config.to_dict()
    del model
    if settings.device == "cuda":
        import torch

        torch.cuda.empty_cache()
    return config


def trl_default_max_length() -> int:
    from trl import SFTConfig

    return next(field.default for field in dataclasses.fields(SFTConfig) if field.name == "max_length")


def qlora_recipe(settings: Settings):
    """qlora's defaults, with the shape's model, rank and max_length; one epoch, no checkpoint inside it."""
    from qlora_cli.recipe import Recipe

    train = {
        "output_dir": str(Path(settings.work_dir) / "qlora-run"),
        "epochs": 1.0,
        "save_steps": 10**9,  # CheckpointingTrainer still saves once after the last step, as `qlora train` does
    }
    if settings.batch_size:
        train["batch_size"] = settings.batch_size
    return Recipe.model_validate(
        {
            "model": {"id": settings.base_dir, "compute_dtype": settings.compute_dtype, "device": settings.device},
            "lora": {"name": "bench", "r": settings.r, "alpha": 2.0 * settings.r, "dropout": LORA_DROPOUT},
            "data": {"path": "synthetic", "max_length": settings.max_length},
            "train": train,
        }
    )


def tutorial_model(settings: Settings):
    """The tutorials' model load: transformers + bitsandbytes NF4, prepare_model_for_kbit_training, get_peft_model."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dtype = getattr(torch, settings.compute_dtype)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        settings.base_dir,
        quantization_config=quantization,
        dtype=dtype,
        device_map="auto" if settings.device == "cuda" else None,
    )
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model)  # also turns gradient checkpointing on
    lora = LoraConfig(
        r=settings.r,
        lora_alpha=2 * settings.r,
        lora_dropout=LORA_DROPOUT,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora), AutoTokenizer.from_pretrained(settings.base_dir)


def tutorial_trainer(settings: Settings, dataset):
    """(a) the tutorial settings."""
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = tutorial_model(settings)
    cpu = settings.device == "cpu"
    settings_used = {
        **TUTORIAL,
        "per_device_train_batch_size": settings.batch_size or TUTORIAL["per_device_train_batch_size"],
    }
    args = SFTConfig(
        output_dir=str(Path(settings.work_dir) / "tutorial-run"),
        **settings_used,
        num_train_epochs=1,
        max_length=settings.max_length,
        bf16=not cpu,
        seed=settings.seed,
        save_strategy="no",
        report_to="none",
        use_cpu=cpu,
        disable_tqdm=True,
    )
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def trl_trainer(settings: Settings, dataset):
    """(b) SFTConfig()'s defaults: only the run's bookkeeping is set (one epoch, no saving, no trackers)."""
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = tutorial_model(settings)
    cpu = settings.device == "cpu"
    overrides = {"per_device_train_batch_size": settings.batch_size} if settings.batch_size else {}
    args = SFTConfig(
        output_dir=str(Path(settings.work_dir) / "trl-run"),
        **overrides,
        num_train_epochs=1,
        seed=settings.seed,
        save_strategy="no",
        report_to="none",
        use_cpu=cpu,
        bf16=not cpu,  # SFTConfig's default; on CPU every arm computes in fp32
        disable_tqdm=True,
    )
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def qlora_trainer(settings: Settings, dataset):
    """(c) qlora's defaults, built by the same functions `qlora train` calls."""
    from transformers import set_seed

    from qlora_cli.lora import attach_lora
    from qlora_cli.model import check_device, load_model, load_tokenizer
    from qlora_cli.train import CheckpointingTrainer, sft_config

    recipe = qlora_recipe(settings)
    device = check_device(recipe.model)
    tokenizer = load_tokenizer(Path(settings.base_dir), recipe.model)
    model = load_model(recipe.model, Path(settings.base_dir), device=device, packed=recipe.train.packing)
    set_seed(settings.seed)
    model = attach_lora(model, recipe.lora, gradient_checkpointing=recipe.train.gradient_checkpointing)
    args = sft_config(recipe, use_cpu=device.type == "cpu")
    return CheckpointingTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        save_limit=recipe.train.save_limit,
    )


TRAINERS = {"tutorial": tutorial_trainer, "trl": trl_trainer, "qlora": qlora_trainer}


# ----------------------------------------------------------------------------------------- measuring


class TokenCounter:
    """Wraps the trainer's collator and records each micro-batch, in the order the dataloader asks for them:
    the trainer draws an optimizer step's micro-batches in order, so batch i belongs to optimizer step
    i // gradient_accumulation_steps, even when the loader prefetches a batch ahead."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[BatchRecord] = []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.batches.append(describe_batch(batch))
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


def arm_config(trainer) -> dict:
    """The settings that shape an arm's speed and memory, read back from the trainer and model that ran."""
    args, model = trainer.args, trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    value = lambda setting: getattr(setting, "value", setting)  # noqa: E731  (enums to their names)
    return {
        "micro_batch": args.per_device_train_batch_size,
        "grad_accum": args.gradient_accumulation_steps,
        "max_length": args.max_length,
        "packing": bool(args.packing),
        "padding_free": bool(trainer.padding_free),
        "gradient_checkpointing": bool(base.is_gradient_checkpointing),
        "optim": value(args.optim),
        "learning_rate": args.learning_rate,
        "lr_scheduler": value(args.lr_scheduler_type),
        "max_grad_norm": args.max_grad_norm,
        "bf16": bool(args.bf16),
        "sampler": value(args.train_sampling_strategy),
        "attention": base.config._attn_implementation,
        "liger_kernel": bool(args.use_liger_kernel),
    }


def measure_arm(arm: str, settings: Settings) -> dict:
    """Runs in a fresh process: load, attach LoRA, train one epoch over the examples, and report."""
    import datasets
    import torch
    from transformers import AutoConfig

    datasets.disable_progress_bars()
    synchronize = torch.cuda.synchronize if settings.device == "cuda" else (lambda: None)
    config = AutoConfig.from_pretrained(settings.base_dir)
    dataset = datasets.Dataset.from_list(
        synthetic_examples(settings, config.vocab_size, config.bos_token_id, config.eos_token_id)
    )
    baseline = reset_peak_memory(settings.device)
    trainer = TRAINERS[arm](settings, dataset)
    counter, timer = TokenCounter(trainer.data_collator), step_timer(synchronize)
    trainer.data_collator = counter
    trainer.add_callback(timer)
    trainer.train()

    setup = arm_config(trainer)
    seconds, batches, accumulation = timer.step_seconds(), counter.batches, setup["grad_accum"]
    steps = len(seconds)
    if steps != math.ceil(len(batches) / accumulation):
        raise RuntimeError(
            f"{arm}: {steps} optimizer steps timed for {len(batches)} micro-batches at accumulation {accumulation}"
        )
    if steps <= settings.warmup:
        raise RuntimeError(
            f"{arm}: the epoch is {steps} optimizer steps, not more than the {settings.warmup} warm-up ones; "
            "give more --examples (or --steps), or fewer --warmup"
        )
    measured = batches[settings.warmup * accumulation :]
    # Varlen flash and flex attention attend within each example; sdpa and eager take a dense mask over the whole row.
    per_example = any(kernel in str(setup["attention"]) for kernel in ("flash", "flex"))
    allocator_peak = peak_memory(settings.device, baseline)
    # On CPU bitsandbytes falls back to ordinary buffers, which the peak RSS already counts.
    paged = paged_optimizer_bytes(trainer.optimizer) if settings.device == "cuda" else 0
    real = sum(batch.real for batch in batches)
    return {
        "arm": arm,
        "config": setup,
        "examples": sum(len(batch.examples) for batch in batches),
        "examples_fingerprint": examples_fingerprint([digest for batch in batches for digest in batch.digests]),
        "optimizer_steps": steps,
        "micro_steps": len(batches),
        "real_tokens": real,
        "computed_tokens": sum(batch.computed for batch in batches),
        "tokens_per_step": real / steps,
        "padding_share": 1 - real / sum(batch.computed for batch in batches),
        "measured_steps": steps - settings.warmup,
        "measured_seconds": sum(seconds[settings.warmup :]),
        "measured_real_tokens": sum(batch.real for batch in measured),
        "measured_computed_tokens": sum(batch.computed for batch in measured),
        "measured_model_pairs": sum(causal_pairs(length) for batch in measured for length in batch.examples),
        "measured_hardware_pairs": sum(
            causal_pairs(length) for batch in measured for length in (batch.examples if per_example else batch.rows)
        ),
        "peak_memory_bytes": allocator_peak + paged,
        "allocator_peak_bytes": allocator_peak,
        "paged_optimizer_bytes": paged,
        "step_seconds": [round(value, 4) for value in seconds],
    }


def measure_in_fresh_process(arm: str, settings: Settings) -> dict:
    spec = Path(settings.work_dir) / f"{arm}-settings.json"
    spec.write_text(json.dumps(dataclasses.asdict(settings)))
    return run_in_fresh_process("benchmarks.bench", "--worker", arm, str(spec))


def matmul_peak_flops(device: str) -> float:
    """Dense matmul rate in the arms' compute dtype: the peak that MFU and HFU divide by.
    On an H100 this measures about 790 TFLOP/s (bf16), below the data sheet's 989 dense peak."""
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


# ------------------------------------------------------------------------------------------- FLOPs


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """Training FLOPs of a QLoRA step, in the terms of plan.flops_per_token: matmuls cost 2 FLOPs per weight
    per token; the base weights are frozen, so backward computes their input gradients only, and both
    gradients of the LoRA factors."""

    forward: float  # per token: decoder linears, LoRA factors and the LM head
    recompute: float  # per token: what gradient checkpointing runs again (the decoder layers' forward)
    backward: float  # per token: input gradients through frozen linears and the head, both LoRA gradients
    attention: float  # per (query, key) pair over all layers, forward: QK^T and AV, 2 x 2 x attention width

    def model_flops(self, real_tokens: int, pairs: int) -> float:
        """Useful work: real tokens, each example's own causal attention, attention backward 2x its forward."""
        return real_tokens * (self.forward + self.backward) + pairs * self.attention * 3

    def hardware_flops(self, computed_tokens: int, pairs: int, checkpointing: bool) -> float:
        """Work done: padding included, and the checkpointed layers' forward again (attention included)."""
        recompute = checkpointing * (computed_tokens * self.recompute + pairs * self.attention)
        return computed_tokens * (self.forward + self.backward) + pairs * self.attention * 3 + recompute


def flop_model(config: dict, r: int) -> FlopModel:
    from qlora_cli.memory import count_parameters, lora_parameters, model_shape

    shape = model_shape(config)
    linear = count_parameters(config)["linear"]
    lora = lora_parameters(config, r, "all-linear")
    head = 2 * shape.vocab * shape.hidden
    layers_forward = 2 * linear + 2 * lora
    return FlopModel(
        forward=layers_forward + head,
        recompute=layers_forward,
        backward=2 * linear + 4 * lora + head,
        attention=2 * 2 * shape.attention_width * shape.layers,
    )


# ------------------------------------------------------------------------------------------ reporting


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    models = [
        line.split(":", 1)[1].strip()
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("model name")
    ]
    return f"{models[0] if models else platform.processor() or 'CPU'}, {len(models) or '?'} cores (CPU)"


def flops_text(value: float) -> str:
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,.0f} FLOP"


def check_same_examples(rows: list[dict], fingerprint: str, examples: int, real_tokens: int) -> None:
    """The comparison is only fair if every arm trained on exactly the data set: refuse to report otherwise."""
    for row in rows:
        seen = (row["examples_fingerprint"], row["examples"], row["real_tokens"])
        if seen != (fingerprint, examples, real_tokens):
            raise RuntimeError(
                f"arm {row['arm']} trained on {row['examples']} examples, {row['real_tokens']} real tokens "
                f"({row['examples_fingerprint']}); "
                f"the data set is {examples} examples, {real_tokens} real tokens ({fingerprint})"
            )


def summarise(rows: list[dict], flops: FlopModel, peak_flops: float) -> None:
    """Adds throughput, the ratios against arm (a), MFU and HFU to each row."""
    for row in rows:
        seconds = row["measured_seconds"]
        row["tokens_per_second"] = row["measured_real_tokens"] / seconds
        row["model_flops"] = flops.model_flops(row["measured_real_tokens"], row["measured_model_pairs"])
        row["hardware_flops"] = flops.hardware_flops(
            row["measured_computed_tokens"], row["measured_hardware_pairs"], row["config"]["gradient_checkpointing"]
        )
        row["mfu"] = row["model_flops"] / seconds / peak_flops
        row["hfu"] = row["hardware_flops"] / seconds / peak_flops
    tutorial = rows[0]
    for row in rows:
        row["speedup"] = row["tokens_per_second"] / tutorial["tokens_per_second"]
        row["memory_ratio"] = row["peak_memory_bytes"] / tutorial["peak_memory_bytes"]


def targets(report: dict) -> list[tuple[str, bool]]:
    qlora = next(row for row in report["rows"] if row["arm"] == "qlora")
    return [
        (
            f"(c) real tokens/s >= {TARGET_SPEEDUP:.1f}x (a): {qlora['speedup']:.2f}x",
            qlora["speedup"] >= TARGET_SPEEDUP,
        ),
        (
            f"(c) peak memory <= {TARGET_MEMORY_RATIO:.1f}x (a): {qlora['memory_ratio']:.2f}x",
            qlora["memory_ratio"] <= TARGET_MEMORY_RATIO,
        ),
        (f"(c) MFU >= {100 * TARGET_MFU:.0f}%: {100 * qlora['mfu']:.1f}%", qlora["mfu"] >= TARGET_MFU),
    ]


def table_columns(report: dict) -> list[str]:
    # Short headers: eleven columns fit the 120 columns rich gets when piped; the caption spells them out.
    memory = "GPU GiB" if report["device"] == "cuda" else "RSS+ GiB"
    return ["arm", "batch", "steps", "tokens/step", "padding", "tokens/s", "speed-up", memory, "vs (a)", "MFU", "HFU"]


def table_rows(report: dict) -> list[list[str]]:
    return [
        [
            ARMS[row["arm"]],
            f"{row['config']['micro_batch']} x {row['config']['grad_accum']}",
            f"{row['optimizer_steps']:,}",
            f"{row['tokens_per_step']:,.0f}",
            f"{100 * row['padding_share']:.0f}%",
            f"{row['tokens_per_second']:,.0f}",
            f"{row['speedup']:.2f}x",
            f"{row['peak_memory_bytes'] / 2**30:.2f}",
            f"{row['memory_ratio']:.2f}x",
            f"{100 * row['mfu']:.1f}%",
            f"{100 * row['hfu']:.1f}%",
        ]
        for row in report["rows"]
    ]


def render_table(report: dict) -> Table:
    settings, data = report["settings"], report["data"]
    table = Table(
        title=f"QLoRA training, {settings['shape']} shape, LoRA r={settings['r']}: one epoch of {data['examples']:,} examples "
        f"({data['real_tokens']:,} real tokens) per arm",
        caption=f"batch: micro-batch x gradient accumulation; steps: optimizer steps in the epoch; tokens: real (non-padding) "
        f"tokens; tokens/s after {settings['warmup']} warm-up step(s); peak memory and its ratio to (a). "
        f"MFU: model FLOPs (no padding, no recompute; {flops_text(report['model_flops_per_token'])}/token here), "
        f"HFU: hardware FLOPs (padding and recompute too), both against {flops_text(report['peak_flops'])}/s. "
        f"{report['device_name']}; memory: {report['memory_kind']}",
    )
    for column in table_columns(report):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for row in table_rows(report):
        table.add_row(*row)
    return table


SETTING_LABELS = {
    "micro_batch": "per-device micro-batch",
    "grad_accum": "gradient accumulation",
    "max_length": "max_length",
    "packing": "packing",
    "padding_free": "padding-free batches",
    "gradient_checkpointing": "gradient checkpointing",
    "optim": "optimizer",
    "learning_rate": "learning rate",
    "lr_scheduler": "scheduler",
    "max_grad_norm": "max_grad_norm",
    "bf16": "bf16",
    "sampler": "sampler",
    "attention": "attention",
    "liger_kernel": "liger kernels",
}


def render_markdown(report: dict) -> str:
    settings, lengths, data = report["settings"], report["lengths"], report["data"]
    columns = table_columns(report)
    rows = report["rows"]
    lines = [
        "# Training benchmark: the QLoRA tutorial stack, TRL's defaults and qlora's defaults",
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
        lines += ["Targets for (c) against (a):", ""]
        lines += [f"- {'met' if met else 'NOT met'}: {text}" for text, met in targets(report)]
        lines.append("")
    else:
        lines += [
            "The targets ((c) >= 2x (a) in real tokens/s, <= 0.6x its peak memory, >= 40% MFU) are for an H100/H200; "
            "on CPU the table only shows that the benchmark works.",
            "",
        ]
    lines += [
        "## What ran",
        "",
        f"- Base: `{settings['shape']}` Mistral shape with random weights ({report['parameters'] / 1e6:,.1f} M parameters), "
        f"saved as bf16 safetensors, loaded in 4-bit NF4 with double quantization, {settings['compute_dtype']} compute; "
        f"LoRA r={settings['r']}, alpha {2 * settings['r']}, dropout {LORA_DROPOUT} on every linear layer in every arm. "
        "Each arm in a fresh process.",
        "- (a) tutorial: the QLoRA tutorial settings (HF bitsandbytes/QLoRA blog notebooks, artidoro/qlora): "
        "`prepare_model_for_kbit_training` + `get_peft_model`, TRL `SFTTrainer`, batches padded to their longest example.",
        "- (b) TRL defaults: the same model load and LoRA, TRL `SFTConfig()` as installed, one epoch instead of its default three.",
        "- (c) qlora: `model.load_model`, `lora.attach_lora`, `train.sft_config`, `train.CheckpointingTrainer` with the "
        "recipe schema's defaults, as `qlora train` runs them.",
        "- All three use TRL's SFTTrainer as installed, so the loss goes through its fused LM head in every arm: "
        "the comparison is of settings, not of library versions.",
        "",
        "| setting | " + " | ".join(ARMS[row["arm"]] for row in rows) + " |",
        "|---|" + "|".join("---" for _ in rows) + "|",
        *(
            f"| {label} | " + " | ".join(str(row["config"][key]) for row in rows) + " |"
            for key, label in SETTING_LABELS.items()
        ),
        "| optimizer steps | "
        + " | ".join(f"{row['optimizer_steps']:,} ({row['measured_steps']:,} timed)" for row in rows)
        + " |",
        "| real tokens per step | " + " | ".join(f"{row['tokens_per_step']:,.0f}" for row in rows) + " |",
        "| computed tokens (epoch) | " + " | ".join(f"{row['computed_tokens']:,}" for row in rows) + " |",
        "",
        "## How it is measured",
        "",
        f"- Same examples: every arm trains one epoch over the same {data['examples']:,} examples ({data['real_tokens']:,} real tokens); "
        f"each arm fingerprints the token ids its collator saw, and the run stops unless every arm matches the data set "
        f"(`{data['fingerprint']}`).",
        f"- Throughput: real (non-padding) tokens of the optimizer steps after the first {settings['warmup']}, divided by their wall "
        "time (data loading, forward, backward, optimizer; the device synchronized at each step's end). Padding is the share of "
        "computed tokens that were padding.",
        f"- MFU: model FLOPs of those real tokens (forward {flops_text(report['flops']['forward'])}/token, backward without base "
        f"weight gradients {flops_text(report['flops']['backward'])}/token, plus causal attention within each example, backward 2x "
        "forward; no recompute, no padding) per second, against the peak.",
        f"- HFU: hardware FLOPs: every computed token including padding, plus the recompute of checkpointed layers "
        f"({flops_text(report['flops']['recompute'])}/token) and causal attention over each computed row (padded rows; a padding-free "
        "row counts as one sequence unless the kernel is varlen flash). Kernels that take a dense mask compute about twice "
        "that attention; it is not counted.",
        f"- Peak: {flops_text(report['peak_flops'])}/s ({report['peak_flops_source']}).",
        f"- Memory: {report['memory_kind']}.",
        "",
        "## Data",
        "",
        f"{lengths['examples']:,} synthetic examples of random token ids. Lengths (EOS included) are lognormal with median "
        f"{ALPACA_MEDIAN_TOKENS} x max_length/{ALPACA_MAX_LENGTH} tokens and sigma {ALPACA_SIGMA}, like alpaca rendered in "
        f"its template and tokenized with a Llama/Mistral tokenizer (median ~150-200 tokens, a long tail to ~1k), clipped to "
        f"[{MIN_TOKENS}, {settings['length_cap']}] (the smallest max_length of the three arms, so no arm truncates); the prompt is "
        f"{PROMPT_SHARE[0]:.0%}-{PROMPT_SHARE[1]:.0%} of each example and masked from the loss (labels -100), the response "
        f"and EOS are learned. Sampled: mean {lengths['mean']}, median {lengths['median']}, p90 {lengths['p90']}, "
        f"p99 {lengths['p99']}, max {lengths['max']} tokens (seed {settings['seed']}).",
        "",
        "## Versions",
        "",
        f"Python {platform.python_version()}; "
        + ", ".join(f"{name} {version}" for name, version in report["versions"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def rerun_command(args: argparse.Namespace) -> str:
    epoch = ["--examples", str(args.examples)] if args.examples else ["--steps", str(args.steps)]
    command = ["python", "-m", "benchmarks.bench", "--shape", args.shape, *epoch, "--warmup", str(args.warmup)]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    command += ["--max-length", str(args.max_length), "--r", str(args.r), "--seed", str(args.seed)]
    if args.peak_tflops:
        command += ["--peak-tflops", str(args.peak_tflops)]
    for flag in ("json", "markdown"):
        if getattr(args, flag):
            command += [f"--{flag}", str(getattr(args, flag))]
    return shlex.join(command)


def resolve_settings(args: argparse.Namespace, device: str, scratch: str) -> Settings:
    """The epoch: --examples, or enough examples for warmup + steps optimizer steps of arm (c)."""
    settings = Settings(
        shape=args.shape,
        examples=args.examples or 1,
        length_cap=min(args.max_length, trl_default_max_length()),
        warmup=args.warmup,
        batch_size=args.batch_size,
        max_length=args.max_length,
        r=args.r,
        seed=args.seed,
        device=device,
        base_dir=str(Path(scratch) / "base"),
        work_dir=scratch,
    )
    if args.examples:
        return settings
    train = qlora_recipe(settings).train
    tokens_per_step = train.batch_size * train.grad_accum * args.max_length
    return dataclasses.replace(
        settings, examples=examples_for_steps(args.steps, args.warmup, tokens_per_step, args.max_length)
    )


def run(args: argparse.Namespace, device: str) -> dict:
    from qlora_cli.memory import count_parameters

    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as scratch:
        settings = resolve_settings(args, device, scratch)
        log.info("building a random %s base in %s", args.shape, settings.base_dir)
        config = save_base(settings)
        examples = synthetic_examples(settings, config["vocab_size"], config["bos_token_id"], config["eos_token_id"])
        data = {
            "examples": len(examples),
            "real_tokens": sum(len(example["input_ids"]) for example in examples),
            "fingerprint": examples_fingerprint([example_digest(example["input_ids"]) for example in examples]),
        }
        if args.peak_tflops:
            peak_flops, peak_source = args.peak_tflops * 1e12, "stated with --peak-tflops"
        else:
            peak_flops = matmul_peak_flops(device)
            peak_source = (
                f"measured: dense {'bf16 8192' if device == 'cuda' else 'fp32 1024'}-square matmuls on this device"
            )
        rows = []
        for arm, label in ARMS.items():
            log.info(
                "%s: loading in 4-bit and training one epoch of %d examples in a fresh process",
                label,
                settings.examples,
            )
            rows.append(measure_in_fresh_process(arm, settings))
            log.info(
                "%s: %d optimizer steps of %.0f real tokens",
                label,
                rows[-1]["optimizer_steps"],
                rows[-1]["tokens_per_step"],
            )
    check_same_examples(rows, data["fingerprint"], data["examples"], data["real_tokens"])
    flops = flop_model(config, settings.r)
    summarise(rows, flops, peak_flops)
    pairs = sum(causal_pairs(len(example["input_ids"])) for example in examples)
    return {
        "date": datetime.date.today().isoformat(),
        "command": rerun_command(args),
        "device": device,
        "device_name": device_name(device),
        "settings": {**dataclasses.asdict(settings), "steps": args.steps, "compute_dtype": settings.compute_dtype},
        "parameters": count_parameters(config)["total"],
        "data": data,
        "lengths": length_summary([len(example["input_ids"]) for example in examples]),
        "flops": dataclasses.asdict(flops),
        "model_flops_per_token": flops.model_flops(data["real_tokens"], pairs) / data["real_tokens"],
        "peak_flops": peak_flops,
        "peak_flops_source": peak_source,
        "memory_kind": "torch.cuda.max_memory_allocated() since before loading the model, plus bitsandbytes' paged "
        "optimizer state (CUDA managed memory, outside torch's allocator)"
        if device == "cuda"
        else "growth of peak RSS (VmHWM, reset before loading the model) over the RSS after imports",
        "versions": library_versions(LIBRARIES),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shape", choices=SHAPES, help="model shape (default: mistral7b on CUDA, small on CPU; tiny: a smoke test)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="size the epoch for this many timed optimizer steps of arm (c), the one "
        "with the most tokens per step; the other arms take more, smaller steps (default: per shape)",
    )
    parser.add_argument(
        "--warmup", type=int, help="optimizer steps each arm runs before the clock starts (default: per shape)"
    )
    parser.add_argument("--examples", type=int, help="examples in the epoch, instead of sizing it from --steps")
    parser.add_argument("--batch-size", type=int, help="micro-batch of every arm (default: each arm's own: 4, 8, 4)")
    parser.add_argument(
        "--max-length", type=int, help="max_length of arms (a) and (c) (default: 2048 for mistral7b, 256 for small)"
    )
    parser.add_argument("--r", type=int, help="LoRA rank (default: 64 for mistral7b, 8 for small)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--peak-tflops", type=float, help="device peak TFLOP/s for MFU and HFU (default: measured with a matmul)"
    )
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
    for key in ("steps", "warmup", "max_length", "r"):
        if getattr(args, key) is None:
            setattr(args, key, SHAPES[args.shape][key])
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1: the first step also pays for setup")
    if args.examples is not None and args.examples < 1 or args.batch_size is not None and args.batch_size < 1:
        parser.error("--examples and --batch-size must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])

    report = run(args, device)
    console = Console(width=None if sys.stdout.isatty() else 120)  # rich assumes 80 columns when piped
    console.print(render_table(report))
    if device == "cuda":
        for text, met in targets(report):
            console.print(f"[{'green' if met else 'red'}]{'met' if met else 'NOT met'}[/]: {text}")
    else:
        console.print(
            "Targets ((c) 2x (a) real tokens/s, 0.6x its memory, 40% MFU) are for an H100/H200; on CPU the table only shows the benchmark works."
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(render_markdown(report))


if __name__ == "__main__":
    main()
