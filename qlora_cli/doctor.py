"""Command `doctor`: is this box ready to fine-tune, before anything large is downloaded?

Every check runs and prints its line, whatever the others found: a recipe that does not load or a hub
that does not answer is one line among the rest, never the end of the diagnosis. Nothing here waits on
the network for more than a few seconds: the hub is asked once, and when it does not answer the recipe's
model config is looked up in the local cache only (huggingface_hub would otherwise retry for ~30 s).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table
from rich.text import Text

from qlora_cli.errors import ExitCode, QloraError
from qlora_cli.recipe import Recipe, is_local, load_recipe

HUB_TIMEOUT_SECONDS = 3  # one answer within seconds, or the hub counts as unreachable


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


def recipe_check(path: str) -> tuple[Check, Recipe | None]:
    """The recipe loads and validates: the disk check needs its model."""
    try:
        recipe = load_recipe(path)
    except QloraError as error:
        return Check("recipe", False, "; ".join(line.strip() for line in str(error).splitlines())), None
    return Check("recipe", True, f"{path}: adapter {recipe.lora.name!r}, model {recipe.model.id}"), recipe


def disk_check(recipe: Recipe, *, hub_reachable: bool) -> Check:
    """Room for the 16-bit weights in the Hugging Face cache (they download before being quantized)."""
    from qlora_cli.plan import count_parameters, load_config

    model_id = recipe.model.id
    try:
        if is_local(model_id) or hub_reachable:
            config, _ = load_config(recipe)
        else:
            config = cached_config(model_id, recipe.model.revision)
    except QloraError as error:
        return Check("disk", False, str(error))
    if config is None:
        return Check(
            "disk",
            None,
            f"not checked: {model_id}'s config.json is not in the local cache and the hub does not answer",
        )
    needed = count_parameters(config)["total"] * 2
    cache = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(cache).free
    ok = free > needed * 1.2 or is_local(model_id)
    return Check(
        "disk",
        ok,
        f"{free / 1e9:.0f} GB free in {cache}, {model_id} needs ~{needed / 1e9:.1f} GB"
        + ("" if ok else ": free space or set HF_HOME"),
    )


def cached_config(model_id: str, revision: str | None) -> dict | None:
    """The model's config.json from the local Hugging Face cache, without a network request; None if absent."""
    from qlora_cli.plan import cached_config_path, read_config

    path = cached_config_path(model_id, revision)
    return None if path is None else read_config(path)


def hub_endpoint() -> str:
    # Read at call time, as a fresh huggingface_hub would: HF_ENDPOINT points at a mirror (or, in tests, nowhere).
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_check() -> Check:
    """One request with a short timeout: a box without network learns it in seconds, in one line."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return Check("hub", None, "HF_HUB_OFFLINE is set: only cached or local models")
    import urllib.request

    endpoint = hub_endpoint()
    try:
        urllib.request.urlopen(
            urllib.request.Request(f"{endpoint}/api/models?limit=1", method="HEAD"), timeout=HUB_TIMEOUT_SECONDS
        )
    except Exception as error:  # DNS, refused, timeout, proxy, TLS: all mean the same to the user
        reason = getattr(error, "reason", None) or error
        return Check(
            "hub",
            None,
            f"{endpoint} unreachable ({type(reason).__name__}); use local folders or cached models",
        )
    token = "token set" if os.environ.get("HF_TOKEN") else "no HF_TOKEN: gated models (Llama, Mistral) need one"
    return Check("hub", True, f"reachable; {token}")


@dataclass(frozen=True)
class Diagnosis:
    checks: tuple[Check, ...]

    @property
    def failed(self) -> bool:
        return any(check.ok is False for check in self.checks)

    @property
    def exit_code(self) -> ExitCode:
        """By the worst check: a failure is USER_ERROR; warnings alone still pass (a laptop without a GPU
        warns, yet runs the tiny recipes), so `qlora doctor && qlora train ...` works there."""
        return ExitCode.USER_ERROR if self.failed else ExitCode.OK


def run(recipe_path: str | None) -> Diagnosis:
    checks = [python_check(), *torch_checks(), bitsandbytes_check()]
    hub = hub_check()  # before the disk check: an unreachable hub means the config comes from the cache only
    checks.append(hub)
    if recipe_path is not None:
        loaded, recipe = recipe_check(recipe_path)
        checks.append(loaded)
        checks.append(
            disk_check(recipe, hub_reachable=hub.ok is True)
            if recipe is not None
            else Check("disk", None, "not checked: the recipe does not load")
        )
    return Diagnosis(tuple(checks))


MARKS = {True: ("OK", "green"), None: ("WARN", "yellow"), False: ("FAIL", "red")}


def render(diagnosis: Diagnosis) -> Table:
    """One row per check: its verdict in colour, its name, what was found or how to fix it. The detail wraps
    under itself at word boundaries, so the verdicts stay a clean column in a narrow terminal."""
    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    for check in diagnosis.checks:
        mark, color = MARKS[check.ok]
        table.add_row(Text(mark, style=color), Text(check.name), Text(check.detail))  # Text: '[' is not markup
    return table
