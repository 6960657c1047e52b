"""Checkpoints that are either complete or invisible, and a resume that picks the newest good one.

The trainer writes each checkpoint into `RUN/.staging/checkpoint-N`; we then write a manifest of
every file and its size (last, after fsync) and rename the folder into `RUN/checkpoint-N`. A
checkpoint without a manifest that matches its files is never picked, so a save cut off by a crash,
a kill -9 or a full disk cannot be mistaken for the latest one. Old checkpoints are pruned only
after a newer one is complete.

The run folder itself is read back through one record, RunFolder: its marker, the recipe it was
started with, whether it finished, and its newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from qlora_cli.errors import ExitCode, QloraError
from qlora_cli.files import MARKER

log = logging.getLogger(__name__)

MANIFEST = "qlora-checkpoint.json"
STAGING = ".staging"
NAME = re.compile(r"^checkpoint-(\d+)$")
# Keys that may change between an interrupted run and its resume without changing what is trained.
RESUMABLE_CHANGES = {"train.logging_steps", "train.eval_steps", "train.save_steps", "train.save_limit"}
RECIPE = "recipe.yaml"  # the resolved recipe a run was started with
METRICS = "metrics.json"  # written once training is done, just before the adapter is exported
LOG_HISTORY = "log_history.json"  # every logged step's loss, lr and eval loss: the data behind loss.png


@dataclass(frozen=True)
class Manifest:
    """Every file of a sealed checkpoint and its size in bytes. Written last, after the files are
    synced, so a checkpoint whose manifest matches its files is complete."""

    files: dict[str, int]

    @classmethod
    def measure(cls, folder: Path) -> Manifest:
        return cls(
            {str(path.relative_to(folder)): path.stat().st_size for path in sorted(folder.rglob("*")) if path.is_file()}
        )

    @classmethod
    def load(cls, checkpoint: Path) -> Manifest:
        """Raises FileNotFoundError when the save never finished, ValueError when the manifest is damaged."""
        manifest = checkpoint / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(manifest)
        try:
            files = json.loads(manifest.read_text())["files"]
        except (KeyError, TypeError) as error:
            raise ValueError(f"unreadable manifest: {error}") from None
        if not isinstance(files, dict) or not all(isinstance(size, int) for size in files.values()):
            raise ValueError("unreadable manifest: files must map names to sizes")
        return cls(files)

    def write(self, checkpoint: Path) -> None:
        manifest = checkpoint / MANIFEST
        manifest.write_text(json.dumps({"files": self.files}, indent=1) + "\n")
        _fsync(manifest)

    def mismatch(self, checkpoint: Path) -> str | None:
        """The first file that is missing or has another size than recorded, or None when all match."""
        for name, size in self.files.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, expected {size}"
        return None


@dataclass(frozen=True)
class RunMarker:
    """The marker (files.MARKER) that says qlora started this run folder, for which adapter; `--force`
    replaces only folders that carry a marker."""

    adapter: str
    recipe_file: str | None = None  # the recipe the run was started from: `train runs/NAME --resume` names it
    kind: ClassVar[str] = "run"

    @classmethod
    def load(cls, run_dir: Path) -> RunMarker | None:
        """None when the folder carries no marker, a damaged one, or another output's (an adapter's)."""
        try:
            record = json.loads((run_dir / MARKER).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("kind") != cls.kind or not isinstance(record.get("adapter"), str):
            return None
        recipe_file = record.get("recipe_file")
        return cls(adapter=record["adapter"], recipe_file=recipe_file if isinstance(recipe_file, str) else None)

    def write(self, run_dir: Path) -> None:
        record = {"kind": self.kind, "adapter": self.adapter, "recipe_file": self.recipe_file}
        (run_dir / MARKER).write_text(json.dumps(record) + "\n")


def original_recipe(recipe_file: Path | None) -> Path | None:
    """The recipe file behind `recipe_file`: a run folder's recorded recipe.yaml stands for the file the run
    was started from (its marker names it), so an adapter resumed from the run folder still names its recipe."""
    if recipe_file is None or recipe_file.name != RECIPE:
        return recipe_file
    marker = RunMarker.load(recipe_file.parent)
    return Path(marker.recipe_file) if marker is not None and marker.recipe_file else recipe_file


@dataclass(frozen=True)
class RunFolder:
    """What `train.output_dir` holds, read once, before any work: whether to refuse, resume or start."""

    path: Path
    exists: bool
    marker: RunMarker | None
    recipe_yaml: str | None  # the recipe the run was started with; None: not a run qlora can resume
    finished: bool  # training completed (metrics written); only the export may be missing
    latest: Path | None  # the newest complete checkpoint

    @classmethod
    def load(cls, run_dir: Path) -> RunFolder:
        recipe = run_dir / RECIPE
        return cls(
            path=run_dir,
            exists=run_dir.exists(),
            marker=RunMarker.load(run_dir),
            recipe_yaml=recipe.read_text() if recipe.is_file() else None,
            finished=(run_dir / METRICS).is_file(),
            latest=latest_checkpoint(run_dir),
        )

    @property
    def interrupted(self) -> bool:
        """A run that stopped early (killed, preempted, crashed) with a checkpoint to continue from."""
        return self.latest is not None and not self.finished


def staging_dir(run_dir: Path) -> Path:
    return run_dir / STAGING


def commit(staged: Path, run_dir: Path, *, keep: int) -> Path:
    """Seal a fully written checkpoint and make it visible in one rename, then prune older ones."""
    manifest = Manifest.measure(staged)
    for name in manifest.files:
        _fsync(staged / name)
    manifest.write(staged)
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
    try:
        manifest = Manifest.load(checkpoint)
    except FileNotFoundError:
        return "no manifest (the save never finished)"
    except ValueError:
        return "unreadable manifest"
    return manifest.mismatch(checkpoint)


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
        # `current` is the full dump of today's schema: a key it lacks was removed from qlora since the run
        # started, and nothing reads it any more, so it is no reason to refuse the resume.
        for key in sorted(set(before) | set(after)):
            path = f"{section}.{key}"
            if key not in after:
                continue
            if before.get(key) != after.get(key) and path not in RESUMABLE_CHANGES:
                changes.append(f"{path}: {before.get(key)!r} -> {after.get(key)!r}")
    return changes


def check_resumable(run: RunFolder, current: dict, *, force: bool) -> Path:
    """The checkpoint to resume from; refuses a changed recipe unless forced."""
    if run.recipe_yaml is None:
        raise QloraError(
            f"--resume: {run.path} holds no qlora run to resume (no {RECIPE}); train without --resume",
            exit_code=ExitCode.NOTHING_TO_RESUME,
        )
    changes = recipe_changes(run.recipe_yaml, current)
    if changes and not force:
        raise QloraError(
            f"--resume: the recipe differs from the one {run.path} was started with:\n  "
            + "\n  ".join(changes)
            + "\nrestore those values, or pass --force to resume with the new ones"
        )
    if run.latest is None:
        raise QloraError(
            f"--resume: no complete checkpoint in {run.path}; start over with --force", exit_code=ExitCode.NO_CHECKPOINT
        )
    return run.latest


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
