"""Atomic writes: results appear complete or not at all.

Everything Phenocoder persists (patch stores, SpatialData zarr, models, tables) is written under a
temporary sibling name and renamed into place when complete, so a failed or killed run never leaves a
half-written result behind and an earlier result survives until the new one is whole.

A folder replaces an earlier one in a single atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``),
so a process killed at any instant leaves either the old or the new folder at the target name, never
neither; elsewhere the old folder is moved aside first and put back by the next write if the process
died between the two renames. Leftovers of killed writes (hidden ``.<name>.tmp-*`` / ``.<name>.old-*``
siblings) are ignored by readers and removed by the next write of the same target once a day old.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Leftovers of killed writes younger than this may belong to a write in progress and are kept.
STALE_SECONDS = 24 * 3600


def _tmp_sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:10]}")


def _leftovers(path: Path) -> list[Path]:
    """Hidden siblings that killed writes of ``path`` left behind (``.<name>.tmp-*``, ``.<name>.old-*``)."""
    if not path.parent.is_dir():
        return []
    prefixes = (f".{path.name}.tmp-", f".{path.name}.old-", f".{path.stem}.tmp-")
    return [p for p in path.parent.iterdir() if p.name.startswith(prefixes)]


def recover(path: str | Path, *, stale_seconds: float = STALE_SECONDS) -> None:
    """Repair what a killed write of ``path`` left: restore a moved-aside folder, drop stale leftovers.

    Parameters
    ----------
    path
        The target of earlier writes (file or folder).
    stale_seconds
        Leftovers older than this are removed; younger ones may belong to a write in progress.

    """
    path = Path(path)
    leftovers = _leftovers(path)
    olds = sorted((p for p in leftovers if p.name.startswith(f".{path.name}.old-")), key=lambda p: p.stat().st_mtime)
    if olds and not path.exists():  # killed between "move the old folder aside" and "move the new one in"
        with contextlib.suppress(OSError):
            os.replace(olds[-1], path)
            leftovers.remove(olds[-1])
    now = time.time()
    for p in leftovers:
        with contextlib.suppress(OSError):
            if now - p.lstat().st_mtime > stale_seconds:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the file system or kernel cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` when the block succeeds.

    On error the temporary folder is removed and ``path`` is left as it was.

    Parameters
    ----------
    path
        The folder to write.
    overwrite
        Replace an existing folder; with False an existing ``path`` raises ``FileExistsError``.

    Yields
    ------
    pathlib.Path
        The temporary folder to fill (a hidden sibling of ``path``).

    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = _tmp_sibling(path, "tmp")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing ``dst``; the old folder is kept until the move is done.

    Parameters
    ----------
    src
        The complete new folder.
    dst
        The target; an existing folder there is replaced atomically where the system allows.

    """
    if dst.is_dir() and not dst.is_symlink() and _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old folder
        return
    old = None
    if dst.exists():
        old = _tmp_sibling(dst, "old")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path (same suffix) that replaces file ``path`` when the block succeeds.

    Parameters
    ----------
    path
        The file to write.

    Yields
    ------
    pathlib.Path
        The temporary file path to write to.

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:10]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a text file atomically.

    Parameters
    ----------
    path
        The file to write.
    text
        Its content.

    Returns
    -------
    pathlib.Path
        ``path``.

    """
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (sorted keys, indented, numpy scalars and arrays converted).

    Parameters
    ----------
    path
        The file to write.
    obj
        JSON-compatible data (numpy values and paths are converted).

    Returns
    -------
    pathlib.Path
        ``path``.

    """
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialize {type(value).__name__} to JSON")
