"""Atomic file writes and file hashes: the one way the project writes state to disk.

A write goes to a temp file in the same folder, is fsynced, then `os.replace`d over the
target, so a reader (or a crash) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import unicodedata
from pathlib import Path
from typing import Any


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (POSIX); a no-op where unsupported."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (bytes, or text as UTF-8) to `path` atomically; returns `path`."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def jsonable(obj: Any) -> Any:
    """json.dumps fallback for tensors/numpy scalars and paths that creep into metadata."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON to `path` atomically."""
    return atomic_write(path, json.dumps(data, indent=2, default=jsonable) + "\n")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def display_name(filename: Any, limit: int = 200, default: str = "upload") -> str:
    """A client's file name as safe display text (NFC, printable, last path part, at most
    `limit` characters; `default` when nothing is left). Never used as a path."""
    text = unicodedata.normalize("NFC", str(filename or ""))
    text = "".join(ch for ch in text if ch.isprintable())
    text = text.replace("\\", "/").rsplit("/", 1)[-1].strip() or default
    return text[:limit]
