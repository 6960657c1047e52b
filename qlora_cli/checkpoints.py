"""Checkpoints that are either complete or invisible, and a resume that picks the newest good one.

The trainer writes each checkpoint into `RUN/.staging/checkpoint-N`; we then write a manifest of
every file and its size (last, after fsync) and rename the folder into `RUN/checkpoint-N`. A
checkpoint without a manifest that matches its files is never picked, so a save cut off by a crash,
a kill -9 or a full disk cannot be mistaken for the latest one. Old checkpoints are pruned only
after a newer one is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from qlora_cli.errors import QloraError

log = logging.getLogger(__name__)

MANIFEST = "qlora-checkpoint.json"
STAGING = ".staging"
NAME = re.compile(r"^checkpoint-(\d+)$")
# Keys that may change between an interrupted run and its resume without changing what is trained.
RESUMABLE_CHANGES = {"train.logging_steps", "train.save_steps", "train.save_limit"}


def staging_dir(run_dir: Path) -> Path:
    return run_dir / STAGING


def commit(staged: Path, run_dir: Path, *, keep: int) -> Path:
    """Seal a fully written checkpoint and make it visible in one rename, then prune older ones."""
    files = {str(path.relative_to(staged)): path.stat().st_size for path in sorted(staged.rglob("*")) if path.is_file()}
    for name in files:
        _fsync(staged / name)
    manifest = staged / MANIFEST
    manifest.write_text(json.dumps({"files": files}, indent=1) + "\n")
    _fsync(manifest)
    final = run_dir / staged.name
    if final.exists():  # an uncommitted twin from an earlier crash at the same step: ours, replace it
        shutil.rmtree(final)
    staged.rename(final)
    with contextlib.suppress(OSError):
        staged.parent.rmdir()  # the staging folder goes once empty, so a finished run holds only results
    _fsync_dir(run_dir)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def discard_staging(run_dir: Path) -> None:
    shutil.rmtree(staging_dir(run_dir), ignore_errors=True)


def checkpoint_step(path: Path) -> int:
    return int(NAME.match(path.name).group(1))


def all_checkpoints(run_dir: Path) -> list[Path]:
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if p.is_dir() and NAME.match(p.name)), key=checkpoint_step)


def problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be trusted, or None when its manifest matches its files."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        return "no manifest (the save never finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
    return None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return [checkpoint for checkpoint in all_checkpoints(run_dir) if problem(checkpoint) is None]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, saying which newer ones were skipped and why."""
    for checkpoint in reversed(all_checkpoints(run_dir)):
        reason = problem(checkpoint)
        if reason is None:
            return checkpoint
        log.warning("skipping %s: %s; falling back to the previous complete checkpoint", checkpoint.name, reason)
    return None


def recipe_changes(saved_yaml: str, current: dict) -> list[str]:
    """Differences between the recipe a run started with and the one resuming it, by YAML path."""
    import yaml

    saved = yaml.safe_load(saved_yaml)
    changes = []
    for section in sorted(set(saved) | set(current)):
        before, after = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(before) | set(after)):
            path = f"{section}.{key}"
            if before.get(key) != after.get(key) and path not in RESUMABLE_CHANGES:
                changes.append(f"{path}: {before.get(key)!r} -> {after.get(key)!r}")
    return changes


def check_resumable(run_dir: Path, current: dict, *, force: bool) -> Path:
    """The checkpoint to resume from; refuses a changed recipe unless forced."""
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise QloraError(f"--resume: {run_dir} holds no qlora run to resume (no recipe.yaml); train without --resume")
    changes = recipe_changes(saved.read_text(), current)
    if changes and not force:
        raise QloraError(
            f"--resume: the recipe differs from the one {run_dir} was started with:\n  "
            + "\n  ".join(changes)
            + "\nrestore those values, or pass --force to resume with the new ones"
        )
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise QloraError(f"--resume: no complete checkpoint in {run_dir}; start over with --force")
    return checkpoint


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
