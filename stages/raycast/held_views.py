"""Rendered views kept in memory by the process that rendered them, for a later stage of the same
process to use instead of decoding the PNGs it wrote (rl3d train: render, then the CLIP reward).

On a GPU the decoding was most of the CLIP term's time (an H100 run of rl3d train: 6,144 PNGs of
512 px a step, ~8 s). PNG is lossless, so the held pixels are the file's pixels. Each view is held
under its file's absolute path with the file's identity (device, inode, size, modification time)
taken once its write has finished; a file replaced or rewritten since is read from disk again.

A view is a numpy array in host memory or a torch tensor on the device that cast it: with the
views left there, the CLIP term on a GPU stacks them where its model runs instead of stacking
4.8 GB of host arrays a step and copying them over (its forward pass takes ~1 ms a batch).

The holder (rl3d train) calls release() when the step's reward is done. Arrays count against
MAX_BYTES (host memory), tensors against MAX_DEVICE_BYTES (one device per process, as in rl3d
train); views beyond either cap are read from disk as before. This module imports torch only once
a tensor is held or the device's room asked for: importing it touches no GPU."""
from __future__ import annotations

import os
import threading

import numpy as np


def _default_max_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 2 << 30


def _device_max_bytes(device) -> int:
    """A quarter of `device`'s memory: the rest is left to the models of the same step."""
    import torch  # here, not at the top: render.py imports this module and keeps torch out of its open3d path

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory // 4
    return _default_max_bytes()  # a CPU, or a device sharing the machine's memory


MAX_BYTES = _default_max_bytes()   # a quarter of the machine's memory
MAX_DEVICE_BYTES: int | None = None  # _device_max_bytes of the first device asked about
_HELD: dict[str, tuple[tuple, object]] = {}
_LOCK = threading.Lock()
_bytes = {"host": 0, "device": 0}


def _identity(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _kind(pixels) -> str:
    return "host" if isinstance(pixels, np.ndarray) else "device"


def _cap(kind: str, device) -> int:
    global MAX_DEVICE_BYTES
    if kind == "host":
        return MAX_BYTES
    if MAX_DEVICE_BYTES is None:
        MAX_DEVICE_BYTES = _device_max_bytes(device)
    return MAX_DEVICE_BYTES


def hold(path: str | os.PathLike, pixels) -> bool:
    """Keep `pixels` (uint8 [H, W, 3], what was written to `path`, which exists now; a numpy array
    or a torch tensor on any device) for held(). False when its cap is reached or the file is gone."""
    key = os.path.abspath(path)
    ident = _identity(key)
    if ident is None:
        return False
    kind = _kind(pixels)
    cap = _cap(kind, getattr(pixels, "device", None))
    with _LOCK:
        old = _HELD.pop(key, None)
        if old is not None:
            _bytes[_kind(old[1])] -= old[1].nbytes
        if _bytes[kind] + pixels.nbytes > cap:
            return False
        _HELD[key] = (ident, pixels)
        _bytes[kind] += pixels.nbytes
    return True


def held(path: str | os.PathLike):
    """The pixels held for `path` (as held: numpy array or torch tensor) if the file is still the
    one written then, else None."""
    key = os.path.abspath(path)
    entry = _HELD.get(key)
    if entry is None or _identity(key) != entry[0]:
        return None
    return entry[1]


def room(device=None) -> int:
    """Bytes that may still be held: in host memory (numpy arrays), or with `device` (a torch
    device or its name) in that device's memory (tensors)."""
    kind = "host" if device is None else "device"
    return max(0, _cap(kind, device) - _bytes[kind])


def count() -> int:
    return len(_HELD)


def release() -> None:
    """Forget every held view, arrays and tensors (their memory goes back once nothing else refers
    to it; a tensor's to torch's caching allocator)."""
    with _LOCK:
        _HELD.clear()
        for kind in _bytes:
            _bytes[kind] = 0
