"""Atomic file and folder writes and JSON cleaning: the one place every writer of a result goes through.

A reader never sees a half-written file or folder: everything is written to a temporary name beside its
target and moved into place by one rename (POSIX ``rename`` / ``os.replace`` are atomic on one file
system). This module sits at the bottom of the package: it imports nothing from ``hf_atm``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_dir", "atomic_write_json", "atomic_write_text", "jsonable",
           "replace_dir", "temporary_sibling"]


def temporary_sibling(target: str | os.PathLike, suffix: str = "") -> Path:
    """A fresh, unused path beside `target` (``.tmp-<name>-<random><suffix>``): same file system, so a rename
    from it into `target` is atomic; hidden, so globs over the parent skip it."""
    target = Path(target)
    return target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}{suffix}"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and ``os.replace`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 `text`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(x: Any) -> Any:
    """A JSON-safe copy of `x`: NaN / inf become None (JSON has no NaN), tuples become lists, mapping keys
    strings, numpy arrays and scalars Python lists and numbers, enums their value."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist"):  # numpy arrays and scalars, torch tensors
        return jsonable(x.tolist())
    if hasattr(x, "value") and type(x).__module__ != "builtins":  # enum members
        return jsonable(x.value)
    return x


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Write :func:`jsonable` of `obj` as JSON (strict: no NaN) to `path`, atomically."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=indent, allow_nan=False) + "\n")


def atomic_write_dir(target: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Run ``writer(tmp)`` on a fresh temporary folder beside `target`, then move the result into place.

    A missing `target` is created by one ``os.rename`` of the whole folder; an existing one receives each
    written file by ``os.replace`` (files it already holds and that the writer did not write are kept). A
    failing writer leaves `target` untouched and removes the temporary folder.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    tmp.mkdir()
    try:
        writer(tmp)
        if not target.exists():
            os.rename(tmp, target)
            return target
        for src in sorted(tmp.rglob("*")):
            if src.is_file():
                dst = target / src.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def replace_dir(target: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Like :func:`atomic_write_dir`, but `target` ends up holding exactly what `writer` wrote: an existing
    `target` is moved aside, the new folder renamed in, the old one removed (a round checkpoint that is
    rewritten must not keep stale files)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(target)
    tmp.mkdir()
    old = None
    try:
        writer(tmp)
        if target.exists():
            old = temporary_sibling(target, ".old")
            os.rename(target, old)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)
    return target
