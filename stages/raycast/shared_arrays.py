"""Host arrays that worker processes map from shared memory instead of receiving pickled copies.

rl3d render's torch backend casts a batch of views in its own process and hands each mesh's views
to worker processes that encode the PNGs. Pickled through the pool's pipes, every byte is copied
several times (a GPU run of rl3d train: 4.8 GB of views a step, ~16 s of pipe writes in thread
time). A SharedBatch is one file in /dev/shm (memory, not disk) that the renderer copies a batch's
views into straight from the device; a SharedArray is a handle to one array in it, which pickles as
(path, offset, shape, dtype) and maps the file in the worker.

Files are named rl3d-arrays-<pid>-<n>; one whose process is gone (killed) is removed by the next
process that makes a batch."""
from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHM_DIR = "/dev/shm"
PREFIX = "rl3d-arrays"
ALIGN = 64          # bytes: each array starts on a cache line
HEADROOM = 2        # a batch is made only where /dev/shm has this many times its size free
_COUNTER = itertools.count()


@dataclass(frozen=True)
class SharedArray:
    """One array of a SharedBatch, by file and place: what goes through a pool's pipe instead of the data."""
    path: str
    offset: int
    shape: tuple
    dtype: str

    def array(self) -> np.ndarray:
        """The array, mapped read-only (valid while the batch's file exists, or for as long as it is mapped)."""
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def resolved(x):
    """The array behind a SharedArray; anything else as it is."""
    return x.array() if isinstance(x, SharedArray) else x


def shm_free_bytes(directory: str = SHM_DIR) -> int:
    """Bytes free in `directory` (0 where it does not exist or cannot be written)."""
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
        return 0
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def usable(nbytes: int, directory: str = SHM_DIR) -> bool:
    """Whether a batch of `nbytes` fits in `directory` with room to spare (containers often mount a
    64 MB /dev/shm: a batch that filled it would kill the process with SIGBUS on first touch)."""
    return nbytes > 0 and shm_free_bytes(directory) >= HEADROOM * nbytes


@functools.lru_cache(maxsize=None)
def _swept(directory: str) -> bool:
    """Remove batch files left by processes that no longer run (once per process and directory)."""
    for f in Path(directory).glob(f"{PREFIX}-*-*"):
        try:
            pid = int(f.name.split("-")[2])
            os.kill(pid, 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            pass  # not ours, or another user's live process
    return True


class SharedBatch:
    """A file of `nbytes` in shared memory that arrays are allocated in, one after another.
    close() removes the file; arrays still referenced stay mapped until they are dropped."""

    def __init__(self, nbytes: int, directory: str = SHM_DIR):
        _swept(directory)
        self.path = os.path.join(directory, f"{PREFIX}-{os.getpid()}-{next(_COUNTER)}")
        self.size = int(nbytes)
        with open(self.path, "xb") as f:
            f.truncate(self.size)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r+", shape=(self.size,))
        self._base = self._map.__array_interface__["data"][0]
        self.used = 0

    def alloc(self, shape: tuple, dtype) -> np.ndarray:
        """An uninitialised array in the file, or in ordinary memory when the file is full (its
        handle is then the array itself)."""
        dtype = np.dtype(dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        start = -(-self.used // ALIGN) * ALIGN
        if self._map is None or start + n > self.size:
            return np.empty(shape, dtype)
        self.used = start + n
        return self._map[start:start + n].view(dtype).reshape(shape)

    def handle(self, a: np.ndarray):
        """A SharedArray for an array inside this file (a view of what alloc gave); any other array
        is returned as it is (it will be pickled)."""
        if self._map is None or a is None:
            return a
        offset = a.__array_interface__["data"][0] - self._base
        if not (0 <= offset and offset + a.nbytes <= self.size and a.flags.c_contiguous):
            return a
        return SharedArray(self.path, offset, tuple(a.shape), a.dtype.str)

    def close(self) -> None:
        self._map = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
