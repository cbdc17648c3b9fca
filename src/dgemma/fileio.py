"""Atomic writes: a file or a whole directory becomes visible only when it is complete.

- `write_atomic(path, data)`: the bytes go to a temporary file in the same directory, are flushed to disk
  (fsync), then renamed over `path` (rename is atomic on POSIX), and the directory entry is synced.
- `atomic_directory(path)`: a context manager giving a temporary sibling directory to fill; on success every
  file in it is synced and it replaces `path` (an existing `path` is first renamed aside, then removed); on an
  exception the temporary directory is removed and `path` is untouched. A crash at any moment leaves either
  the old or the new directory under `path` (or, between the two renames, the old one under its aside name,
  which `recover_directory` puts back).
tests/test_train_kill.py kills a training run inside these writes and checks that resuming is exact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

_TMP, _OLD = ".tmp-", ".old-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    path = Path(path)
    tmp = path.with_name(f"{_TMP}{path.name}-{os.getpid()}")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory (deepest first)."""
    dirs = []
    for root, _, files in os.walk(path):
        dirs.append(Path(root))
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
    for d in reversed(dirs):
        fsync_dir(d)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = path.with_name(f"{_TMP}{path.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        sync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f"{_OLD}{path.name}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_directory(path: str | os.PathLike) -> None:
    """Undo an `atomic_directory` interrupted between its two renames, and drop abandoned temporaries."""
    path = Path(path)
    old = path.with_name(f"{_OLD}{path.name}")
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, path)
    for stale in path.parent.glob(f"{_TMP}{path.name}-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
