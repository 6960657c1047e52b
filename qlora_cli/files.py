"""Writes that lose nothing: build in a hidden sibling, then rename; replace only what we made."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from qlora_cli.errors import QloraError

log = logging.getLogger(__name__)

# Every directory the tool writes carries this file; `--force` replaces only directories that have it,
# so a mistyped path can never wipe a user's own folder.
MARKER = "qlora.json"


def refuse_dangerous_output(path: Path, what: str) -> None:
    resolved = path.expanduser().resolve()
    for forbidden, label in (
        (Path("/"), "the filesystem root"),
        (Path.home().resolve(), "your home directory"),
        (Path.cwd(), "the current directory"),
    ):
        if resolved == forbidden:
            raise QloraError(f"{what}: refusing to write into {label} ({resolved}); name a new folder")


def check_new_output(path: Path, what: str, *, force: bool, refusal: str | None = None) -> None:
    """Fail before any work if `path` exists and may not be replaced. `refusal` ends the message in place of
    the offer of --force: a caller that knows the folder is someone else's work (another recipe's adapter)
    names its owner and a way to keep it, since --force would delete it."""
    refuse_dangerous_output(path, what)
    if not path.exists():
        return
    if not force:
        tail = refusal or "; pass --force to replace it (the old one is deleted), or choose another path"
        raise QloraError(f"{what}: {path} already exists{tail}")
    if not (path / MARKER).is_file():
        raise QloraError(
            f"{what}: {path} exists and was not written by qlora (no {MARKER}); not replacing it, even with --force"
        )


def process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_staging(dest: Path) -> list[Path]:
    """Remove the hidden staging folders that writes of `dest` left behind when their process was killed
    (kill -9, a preempted box): nothing else ever would, and a 70B merge leaves up to 140 GB of them.
    Only folders whose process no longer runs go; a write still in progress keeps its own."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(partial|replaced)-(\d+)$")
    removed = []
    if not dest.parent.is_dir():
        return removed
    for leftover in dest.parent.iterdir():
        match = pattern.match(leftover.name)
        if not match or not leftover.is_dir() or process_is_running(int(match.group(2))):
            continue
        size = sum(f.stat().st_size for f in leftover.rglob("*") if f.is_file())
        shutil.rmtree(leftover, ignore_errors=True)
        log.warning(
            "removed %s (%.1f MiB), left by process %s that no longer runs", leftover, size / 2**20, match.group(2)
        )
        removed.append(leftover)
    return removed


@contextlib.contextmanager
def atomic_directory(dest: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling to fill; on success it becomes `dest` in one rename, on failure it vanishes."""
    dest = Path(dest)
    check_new_output(dest, str(dest), force=force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(dest)
    staging = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # a leftover of an earlier process that had our pid
    staging.mkdir()
    try:
        yield staging
        if not (staging / MARKER).is_file():
            raise RuntimeError(f"{staging} was filled without {MARKER}; every qlora output must carry it")
        if dest.exists():
            retired = dest.parent / f".{dest.name}.replaced-{os.getpid()}"
            dest.rename(retired)
            staging.rename(dest)
            shutil.rmtree(retired)
        else:
            staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def prepare_output_file(path: Path, option: str, example: str) -> None:
    """Before any work: fail if a result file cannot be written at `path` (`option` names the flag, e.g.
    --out; `example` is a file name to suggest), and create its parent folders, so minutes of evaluation
    never end on a missing folder."""
    if path.is_dir():
        raise QloraError(f"{option} {path}: is a folder; name a file inside it, e.g. {option} {path / example}")
    existing = next(parent for parent in path.absolute().parents if parent.exists())
    if not existing.is_dir():
        raise QloraError(f"{option} {path}: {existing} is a file, not a folder; choose another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise QloraError(
            f"{option} {path}: cannot create folder {path.parent} ({error.strerror}); choose another path"
        ) from None
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise QloraError(f"{option} {path}: not writable; choose another path, or fix the permissions")
