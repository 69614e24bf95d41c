"""Rendered views kept in memory by the process that rendered them, for a later stage of the same
process to use instead of decoding the PNGs it wrote (rl3d train: render, then the CLIP reward).

On a GPU the decoding was most of the CLIP term's time (an H100 run of rl3d train: 6,144 PNGs of
512 px a step, ~8 s). PNG is lossless, so the held pixels are the file's pixels. Each view is held
under its file's absolute path with the file's identity (device, inode, size, modification time)
taken once its write has finished; a file replaced or rewritten since is read from disk again.

The holder (rl3d train) calls release() when the step's reward is done. At most MAX_BYTES are
held; views beyond that are read from disk as before."""
from __future__ import annotations

import os
import threading

import numpy as np


def _default_max_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 2 << 30


MAX_BYTES = _default_max_bytes()   # a quarter of the machine's memory
_HELD: dict[str, tuple[tuple, np.ndarray]] = {}
_LOCK = threading.Lock()
_bytes = 0


def _identity(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def hold(path: str | os.PathLike, pixels: np.ndarray) -> bool:
    """Keep `pixels` (uint8 [H, W, 3], what was written to `path`, which exists now) for held().
    False when the cap is reached or the file is gone."""
    global _bytes
    key = os.path.abspath(path)
    ident = _identity(key)
    if ident is None:
        return False
    with _LOCK:
        old = _HELD.pop(key, None)
        if old is not None:
            _bytes -= old[1].nbytes
        if _bytes + pixels.nbytes > MAX_BYTES:
            return False
        _HELD[key] = (ident, pixels)
        _bytes += pixels.nbytes
    return True


def held(path: str | os.PathLike) -> np.ndarray | None:
    """The pixels held for `path` if the file is still the one written then, else None."""
    key = os.path.abspath(path)
    entry = _HELD.get(key)
    if entry is None or _identity(key) != entry[0]:
        return None
    return entry[1]


def room() -> int:
    """Bytes that may still be held."""
    return max(0, MAX_BYTES - _bytes)


def count() -> int:
    return len(_HELD)


def release() -> None:
    """Forget every held view (their memory goes back once nothing else refers to it)."""
    global _bytes
    with _LOCK:
        _HELD.clear()
        _bytes = 0
