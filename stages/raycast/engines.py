"""The ray-engine interface, and the choice of engine.

An engine module (open3d_engine, torch_engine) offers
- `prepare_rays(rays, ...)`: camera rays float32[V, H, W, 6] (origin, direction) in the form its
  caster wants (built once per camera set and cached by the renderer), and
- `cast_rays(verts, faces, rays, ...) -> Hits`: the nearest hit of every ray against one triangle
  mesh (verts float32[N, 3], faces uint32[F, 3]), rays numpy or prepared.
t is in units of the direction's length (camera rays have unit forward component, so t is the
z-depth). The two engines agree on all but edge pixels.
"""
from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import numpy as np

from rl3d.formats.errors import InputError

BACKENDS = ("auto", "open3d", "torch")
INVALID_ID = np.uint32(0xFFFFFFFF)  # primitive id of a miss (open3d's RaycastingScene.INVALID_ID)


class Hits(NamedTuple):
    t_hit: np.ndarray          # float32[V, H, W], inf on a miss
    primitive_id: np.ndarray   # uint32[V, H, W], INVALID_ID on a miss


def open3d_available() -> bool:
    """True when open3d is installed (checked without importing it: the import is slow)."""
    return importlib.util.find_spec("open3d") is not None


def cuda_available() -> bool:
    """True when torch sees a CUDA device. torch is imported only where an NVIDIA driver is
    present: importing it costs ~1.5 s of CPU, which CPU-only machines need not pay here."""
    if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_backend(backend: str = "auto") -> str:
    """"open3d" or "torch" for a requested backend. "auto": torch where CUDA is available (many
    meshes at once on the GPU outrun Embree on the host's cores), else open3d when it is
    installed, else torch."""
    if backend not in BACKENDS:
        raise InputError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if cuda_available():
            return "torch"
        return "open3d" if open3d_available() else "torch"
    if backend == "open3d" and not open3d_available():
        raise InputError("--backend open3d: open3d is not installed here (use --backend torch)")
    return backend
