"""Adapter directories: where they live, how they are named, what they say about themselves.

An adapter directory is plain peft output (adapter_config.json + adapter_model.safetensors) plus the
tokenizer, the resolved `recipe.yaml` and `qlora.json`: base model id and weight fingerprint,
template, metrics and library versions. `generate` and `merge` need nothing else.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from qlora_cli.errors import QloraError
from qlora_cli.files import MARKER
from qlora_cli.recipe import ADAPTER_NAME

HOME_ENV = "QLORA_ADAPTERS_DIR"
DEFAULT_HOME = "adapters"  # relative to the working directory, like the runs/ folder beside it
VERSIONED = ("qlora", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate")


def adapters_home(override: str | Path | None = None) -> Path:
    return Path(override or os.environ.get(HOME_ENV) or DEFAULT_HOME)


def adapter_path(name: str, home: str | Path | None = None) -> Path:
    """Where an adapter called `name` lives (whether or not it exists yet)."""
    if not ADAPTER_NAME.match(name):
        raise QloraError(
            f"adapter name {name!r}: use letters, digits, '.', '_' or '-' only (no paths); or pass a folder path"
        )
    return adapters_home(home) / name


def find_adapter(name_or_path: str, home: str | Path | None = None) -> Path:
    """An existing adapter by name (in the adapters home) or by folder path."""
    if os.sep in name_or_path or "/" in name_or_path:
        path = Path(name_or_path)
        if not (path / "adapter_config.json").is_file():
            raise QloraError(f"adapter {name_or_path}: no adapter_config.json in that folder")
        return path
    path = adapter_path(name_or_path, home)
    if not (path / "adapter_config.json").is_file():
        available = ", ".join(sorted(a.name for a in list_adapter_dirs(home))) or "none yet (qlora train writes them)"
        raise QloraError(f"adapter {name_or_path!r} not found in {adapters_home(home)}; available: {available}")
    return path


def list_adapter_dirs(home: str | Path | None = None) -> list[Path]:
    root = adapters_home(home)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "adapter_config.json").is_file()
    )


def read_metadata(adapter_dir: Path) -> dict:
    marker = adapter_dir / MARKER
    if not marker.is_file():
        return {"name": adapter_dir.name, "base": {}, "template": "alpaca", "task": "forward"}
    return json.loads(marker.read_text())


def library_versions() -> dict[str, str]:
    found = {}
    for package in VERSIONED:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def write_metadata(folder: Path, **fields) -> None:
    record = {
        **fields,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
    }
    (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def directory_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
