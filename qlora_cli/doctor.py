"""Command `doctor`: is this box ready to fine-tune, before anything large is downloaded?"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text

from qlora_cli.recipe import Recipe, is_local


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: a warning, not a failure
    detail: str


def python_check() -> Check:
    version = platform.python_version()
    return Check(
        "python",
        sys.version_info >= (3, 10),
        version if sys.version_info >= (3, 10) else f"{version}: install Python 3.10 or newer",
    )


def torch_checks() -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("torch", False, "not installed: bash scripts/setup.sh")]
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    checks = [Check("torch", True, f"{torch.__version__} ({build})")]
    if not torch.cuda.is_available():
        hint = (
            "this torch has no CUDA: bash scripts/setup.sh --cuda"
            if not torch.version.cuda
            else "no GPU visible: check nvidia-smi and CUDA_VISIBLE_DEVICES"
        )
        checks.append(Check("gpu", None, f"none; {hint}. CPU runs only the tiny recipes"))
        return checks
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        checks.append(Check(f"gpu {index}", True, f"{properties.name}, {properties.total_memory / 2**30:.1f} GiB"))
    bf16 = torch.cuda.is_bf16_supported()
    checks.append(
        Check("bf16", bf16 or None, "supported" if bf16 else "not supported: set model.compute_dtype: float16")
    )
    return checks


def bitsandbytes_check() -> Check:
    """Quantize and dequantize one NF4 block on the device training will use: the usual setup failure point."""
    try:
        import bitsandbytes
        import torch
        from bitsandbytes.functional import dequantize_4bit, quantize_4bit
    except Exception as error:  # a broken CUDA setup surfaces as any of several import errors
        return Check(
            "bitsandbytes",
            False,
            f"does not load ({type(error).__name__}: {error}); reinstall: pip install -U bitsandbytes",
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        weights = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
        packed, state = quantize_4bit(weights, quant_type="nf4", compress_statistics=True)
        error = (dequantize_4bit(packed, state) - weights).abs().mean().item()
    except Exception as failure:
        return Check("bitsandbytes", False, f"{bitsandbytes.__version__} cannot run NF4 on {device}: {failure}")
    return Check(
        "bitsandbytes", error < 0.2, f"{bitsandbytes.__version__}, NF4 round trip on {device} (mean error {error:.3f})"
    )


def disk_check(recipe: Recipe) -> Check:
    """Room for the 16-bit weights in the Hugging Face cache (they download before being quantized)."""
    from qlora_cli.plan import count_parameters, load_config

    config, _ = load_config(recipe)
    needed = count_parameters(config)["total"] * 2
    cache = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    ok = free > needed * 1.2 or is_local(recipe.model.id)
    return Check(
        "disk",
        ok,
        f"{free / 1e9:.0f} GB free in {cache}, {recipe.model.id} needs ~{needed / 1e9:.1f} GB"
        + ("" if ok else ": free space or set HF_HOME"),
    )


def hub_check() -> Check:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return Check("hub", None, "HF_HUB_OFFLINE=1: only cached or local models")
    import urllib.request

    try:
        urllib.request.urlopen(
            urllib.request.Request("https://huggingface.co/api/models?limit=1", method="HEAD"), timeout=5
        )
    except Exception as error:
        return Check("hub", None, f"unreachable ({type(error).__name__}); use local folders or a cached model")
    token = "token set" if os.environ.get("HF_TOKEN") else "no HF_TOKEN: gated models (Llama, Mistral) need one"
    return Check("hub", True, f"reachable; {token}")


@dataclass(frozen=True)
class Diagnosis:
    checks: tuple[Check, ...]

    @property
    def failed(self) -> bool:
        return any(check.ok is False for check in self.checks)


def run(recipe: Recipe | None) -> Diagnosis:
    checks = [python_check(), *torch_checks(), bitsandbytes_check()]
    if recipe is not None:
        checks.append(disk_check(recipe))
    checks.append(hub_check())
    return Diagnosis(tuple(checks))


MARKS = {True: ("OK  ", "green"), None: ("WARN", "yellow"), False: ("FAIL", "red")}


def render(diagnosis: Diagnosis) -> Text:
    """One line per check: its verdict in colour, its name, what was found or how to fix it."""
    lines = []
    for check in diagnosis.checks:
        mark, color = MARKS[check.ok]
        lines.append(Text.assemble((mark, color), f" {check.name:<13} {check.detail}"))
    return Text("\n").join(lines)
