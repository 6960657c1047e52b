"""Atomic writes: staging folders left by a killed process are removed by the next write, live ones kept."""

import itertools
import logging
import os
from pathlib import Path

import pytest

from qlora_cli.files import MARKER, atomic_directory

# Pids above the kernel's pid_max: never a running process, where a reaped child's pid can be reused at once on a
# busy machine.
NEVER_RUNNING = itertools.count(int(Path("/proc/sys/kernel/pid_max").read_text()) + 1)


def dead_pid() -> int:
    return next(NEVER_RUNNING)


def test_a_killed_writers_staging_folder_is_removed_by_the_next_write(tmp_path, caplog):
    dest = tmp_path / "merged"
    stale = tmp_path / f".merged.partial-{dead_pid()}"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 4096)
    retired = tmp_path / f".merged.replaced-{dead_pid()}"
    retired.mkdir()
    alive = tmp_path / f".merged.partial-{os.getppid()}"  # a write in progress in another process
    alive.mkdir()
    other = tmp_path / f".other.partial-{dead_pid()}"  # a different destination's: not ours to judge here
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="qlora_cli.files"):
        with atomic_directory(dest) as staging:
            (staging / MARKER).write_text("{}")
    assert dest.is_dir()
    assert not stale.exists() and not retired.exists()
    assert alive.exists() and other.exists()
    assert str(stale) in caplog.text and "no longer runs" in caplog.text


def test_a_failed_write_leaves_nothing(tmp_path):
    dest = tmp_path / "adapter"
    with pytest.raises(RuntimeError):
        with atomic_directory(dest) as staging:
            (staging / "half").write_text("x")
            raise RuntimeError("disk gone")
    assert list(tmp_path.iterdir()) == []
