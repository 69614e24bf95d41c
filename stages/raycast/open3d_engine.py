"""Ray engine on open3d's RaycastingScene (Embree BVH, multi-threaded CPU, no GL needed).

open3d is imported inside the functions on purpose: it is a large optional wheel (absent on
some GPU machines) and slow to import, and the torch engine must work without it.
"""
from __future__ import annotations

import numpy as np

from rl3d.stages.raycast.engines import Hits


def prepare_rays(rays: np.ndarray):
    """Camera rays as an open3d tensor (built once per camera set)."""
    import open3d as o3d

    return o3d.core.Tensor(np.array(rays))


def cast_rays(verts: np.ndarray, faces: np.ndarray, rays) -> Hits:
    """Nearest hits with open3d's Embree scene; `rays` numpy or prepared (an open3d tensor)."""
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(verts), o3d.core.Tensor(faces))
    hits = scene.cast_rays(rays if isinstance(rays, o3d.core.Tensor) else o3d.core.Tensor(rays))
    return Hits(hits["t_hit"].numpy(), hits["primitive_ids"].numpy())
