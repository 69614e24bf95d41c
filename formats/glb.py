"""GLB read/write with trimesh, in glTF conventions (Y-up, metres; see formats/voxels.py)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rl3d.formats.shards import atomic_path


def write_glb(mesh, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a trimesh.Trimesh as GLB atomically. Per-face colours are kept exact by unmerging
    vertices first (glTF stores colours per vertex)."""
    import trimesh

    mesh = mesh.copy()
    if mesh.visual.kind == "face":
        fc = np.asarray(mesh.visual.face_colors).copy()
        mesh.unmerge_vertices()
        mesh.visual = trimesh.visual.ColorVisuals(mesh, face_colors=fc)
        vc = np.repeat(fc, 3, axis=0)  # unmerged: vertex 3i+k belongs to face i
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=vc)
    if metadata:
        mesh.metadata.update(metadata)
    with atomic_path(path) as tmp:
        mesh.export(tmp, file_type="glb", include_normals=True)
    return Path(path)


def read_glb(path: str | os.PathLike):
    """Load a GLB as one trimesh.Trimesh. Raises ValueError for a corrupt or empty file."""
    import trimesh

    try:
        mesh = trimesh.load(str(path), file_type="glb", force="mesh", process=False)
    except Exception as e:
        raise ValueError(f"cannot read GLB {path}: {type(e).__name__}: {e}") from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"GLB {path} holds no triangles")
    return mesh


def face_rgb(mesh) -> np.ndarray:
    """(F, 3) uint8 face colours of a loaded mesh (mean of its vertices' colours, exact when unmerged)."""
    vis = mesh.visual
    if vis.kind == "vertex":
        vc = np.asarray(vis.vertex_colors)[:, :3].astype(np.float32)
        return np.round(vc[mesh.faces].mean(1)).astype(np.uint8)
    if vis.kind == "face":
        return np.asarray(vis.face_colors)[:, :3].astype(np.uint8)
    if vis.kind == "texture" and getattr(vis, "uv", None) is None and vis.material is not None:
        # an untextured material (formats.occupancy meshes): its base colour on every face
        return np.tile(np.asarray(vis.material.main_color)[:3].astype(np.uint8), (len(mesh.faces), 1))
    try:
        return np.asarray(vis.to_color().vertex_colors)[:, :3][mesh.faces[:, 0]].astype(np.uint8)
    except Exception:
        return np.full((len(mesh.faces), 3), 180, np.uint8)
