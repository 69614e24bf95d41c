"""GLB read/write with trimesh, in glTF conventions (Y-up, metres; see formats/voxels.py)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rl3d.formats.shards import atomic_path


def write_glb(mesh, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write a trimesh.Trimesh as GLB atomically. glTF stores colours per vertex, so per-face colours
    stay exact only where each vertex's faces share one colour: a mesh whose faces already own their
    vertices in that sense (formats/voxels.py gives each cube face its own 4) is written as it is,
    any other is unmerged first (3 vertices a face). Each vertex's normal is its faces' normal, so
    faces render flat either way."""
    written = flat_vertex_mesh(mesh) if mesh.visual.kind == "face" else None
    if written is None:
        written = unmerged_mesh(mesh)
    if metadata:
        written.metadata.update(metadata)
    with atomic_path(path) as tmp:
        written.export(tmp, file_type="glb", include_normals=True)
    return Path(path)


def unmerged_mesh(mesh):
    """A copy of the mesh; with face colours, unmerged (3 vertices a face) and coloured per vertex."""
    import trimesh

    written = mesh.copy()
    if written.visual.kind == "face":
        fc = np.asarray(written.visual.face_colors).copy()
        written.unmerge_vertices()
        vc = np.repeat(fc, 3, axis=0)  # unmerged: vertex 3i+k belongs to face i
        written.visual = trimesh.visual.ColorVisuals(written, vertex_colors=vc)
    return written


def flat_vertex_mesh(mesh):
    """The mesh with per-vertex colours and normals taken from its faces, when every vertex's faces
    share one colour and one normal (then nothing is lost without unmerging: a voxel mesh's 4
    vertices a cube face against 6, a third less to write and 1.6x faster, see
    benchmarks/bench_meshes.py); else None."""
    import trimesh

    faces = np.asarray(mesh.faces)
    if len(faces) == 0:
        return None
    fc = np.asarray(mesh.visual.face_colors)
    fn = np.asarray(mesh.face_normals, dtype=np.float64)
    vc = np.zeros((len(mesh.vertices), 4), np.uint8)
    vn = np.zeros((len(mesh.vertices), 3), np.float64)
    for k in range(3):  # the last face written wins; the check below says whether they all agree
        vc[faces[:, k]] = fc
        vn[faces[:, k]] = fn
    if not (vc[faces] == fc[:, None]).all() or (np.einsum("fkc,fc->fk", vn[faces], fn) < 1.0 - 1e-6).any():
        return None
    return trimesh.Trimesh(vertices=mesh.vertices, faces=faces, vertex_normals=vn, vertex_colors=vc, process=False,
                           metadata=dict(mesh.metadata))


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
