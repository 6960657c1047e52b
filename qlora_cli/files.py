"""Writes that lose nothing: build in a hidden sibling, then rename; replace only what we made."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from qlora_cli.errors import QloraError

# Every directory the tool writes carries this file; `--force` replaces only directories that have it,
# so a mistyped path can never wipe a user's own folder.
MARKER = "qlora.json"


def refuse_dangerous_output(path: Path, what: str) -> None:
    resolved = path.expanduser().resolve()
    for forbidden, label in ((Path("/"), "the filesystem root"), (Path.home().resolve(), "your home directory"), (Path.cwd(), "the current directory")):
        if resolved == forbidden:
            raise QloraError(f"{what}: refusing to write into {label} ({resolved}); name a new folder")


def check_new_output(path: Path, what: str, *, force: bool) -> None:
    """Fail before any work if `path` exists and may not be replaced."""
    refuse_dangerous_output(path, what)
    if not path.exists():
        return
    if not force:
        raise QloraError(f"{what}: {path} already exists; pass --force to replace it")
    if not (path / MARKER).is_file():
        raise QloraError(f"{what}: {path} exists and was not written by qlora (no {MARKER}); not replacing it, even with --force")


@contextlib.contextmanager
def atomic_directory(dest: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling to fill; on success it becomes `dest` in one rename, on failure it vanishes."""
    dest = Path(dest)
    check_new_output(dest, str(dest), force=force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # our own leftover from a crashed run with this pid
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
