"""Files that are complete or absent: the one atomic writer every output of mtnlg goes through.

A crash at any moment must leave the previous file (or checkpoint directory) intact, so every
writer fills a temporary sibling, fsyncs it, renames it over the target and fsyncs the parent
directory (without that last step the rename itself can be lost on power failure). The
temporary sibling is always ``.NAME.tmp`` (``.NAME.tmp-PID`` for a file that several processes
may write at once), so a stale one is easy to recognise and remove.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def temp_path(target: str | Path, unique: bool = False) -> Path:
    """The temporary sibling ``target`` is written as: ``.NAME.tmp``, or with ``unique`` ``.NAME.tmp-PID``.

    A fixed name lets every rank of a job find a directory that rank 0 created; a unique one keeps
    two processes that write the same file (two workers building one cache) out of each other's way.
    """
    target = Path(target)
    return target.with_name(f".{target.name}.tmp" + (f"-{os.getpid()}" if unique else ""))


def fsync_dir(path: str | Path) -> None:
    """Persist the entries of directory ``path`` (a rename into it reaches the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file under ``path`` and every directory, so a later rename commits all of it."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def commit_file(tmp: Path, target: Path) -> None:
    """Rename the finished (already fsynced) ``tmp`` over ``target`` and persist the rename."""
    os.replace(tmp, target)
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w", unique: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``target`` for writing; on a clean exit it is synced and renamed
    over ``target``, on an exception removed (``target``, if it existed, is untouched)."""
    target = Path(target)
    tmp = temp_path(target, unique=unique)
    encoding = None if "b" in mode else "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        commit_file(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(target: str | Path, text: str) -> None:
    """Replace ``target`` with ``text`` atomically."""
    with atomic_file(target) as f:
        f.write(text)


def write_json(target: str | Path, data: Any, indent: int | None = 1, sort_keys: bool = False) -> None:
    """Replace ``target`` with ``data`` as JSON, atomically."""
    write_text(target, json.dumps(data, indent=indent, sort_keys=sort_keys))


def fresh_dir(target: str | Path) -> Path:
    """An empty staging directory for ``target`` (``.NAME.tmp``), a killed writer's leftover removed."""
    staging = temp_path(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def commit_dir(staging: Path, target: Path) -> None:
    """Sync ``staging`` and rename it to ``target``, replacing an existing ``target`` only then."""
    fsync_tree(staging)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    fsync_dir(target.parent)


def atomic_dir(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create directory ``target`` by letting ``fill`` write into a staging sibling, then rename it.

    An existing ``target`` is replaced only after the new one is complete and synced.
    """
    target = Path(target)
    staging = fresh_dir(target)
    try:
        fill(staging)
        commit_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: str | Path, error: type[Exception] = ValueError) -> Any:
    """The JSON document in ``path``; a missing, unreadable or invalid file raises ``error`` with a
    one-line message naming the file (and the line and column of a syntax error)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} is missing") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
