"""Voxel grids: the one orientation convention and the named colour palette.

A grid is a uint8 array `grid[x, y, z]` of shape (R, R, R): 0 = empty, k >= 1 = palette colour k.
World frame = glTF's: right-handed, +Y up, +Z front, metres. The grid fills the unit cube
[-0.5, 0.5]^3 centred at the origin; index y = 0 is the ground layer (y = -0.5), x grows to
the object's left (+X), z grows to its front (+Z). Voxel (i, j, k) spans
[-0.5 + i/R, -0.5 + (i+1)/R] on each axis.
"""
from __future__ import annotations

import numpy as np

RESOLUTION = 32

# name -> sRGB. Index in the palette is position + 1 (0 means empty).
PALETTE_NAMES = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
                 "white", "gray", "black", "cyan", "teal", "gold", "beige", "navy")
PALETTE_RGB = np.array([
    (214, 39, 40), (255, 127, 14), (240, 210, 30), (44, 160, 44), (31, 119, 220), (148, 80, 189),
    (240, 120, 180), (140, 86, 55), (240, 240, 240), (128, 128, 128), (35, 35, 35), (23, 210, 230),
    (0, 128, 128), (212, 175, 55), (225, 205, 160), (20, 30, 110)], dtype=np.uint8)
NUM_COLORS = len(PALETTE_NAMES)
COLOR_INDEX = {name: i + 1 for i, name in enumerate(PALETTE_NAMES)}


def color_id(name: str) -> int:
    return COLOR_INDEX[name]


def color_name(cid: int) -> str:
    return PALETTE_NAMES[int(cid) - 1]


def empty_grid(r: int = RESOLUTION) -> np.ndarray:
    return np.zeros((r, r, r), np.uint8)


def to_bytes(grid: np.ndarray) -> bytes:
    return np.ascontiguousarray(grid, np.uint8).tobytes()


def from_bytes(data: bytes, r: int = RESOLUTION) -> np.ndarray:
    a = np.frombuffer(data, np.uint8)
    if a.size != r ** 3:
        raise ValueError(f"voxel blob has {a.size} bytes, expected {r ** 3}")
    return a.reshape(r, r, r).copy()


def coarsen_grid(grid: np.ndarray, factor: int = 2) -> np.ndarray:
    """A blockier version of a grid at the same resolution: each factor^3 cell becomes solid in its
    majority colour when at least half of it is occupied. The level-1 (coarse) SFT target."""
    r = grid.shape[0]
    n = r // factor
    cells = grid.reshape(n, factor, n, factor, n, factor).transpose(0, 2, 4, 1, 3, 5).reshape(n, n, n, -1)
    occupied = (cells > 0).sum(-1) * 2 >= factor ** 3
    counts = np.stack([(cells == c).sum(-1) for c in range(1, NUM_COLORS + 1)], -1)
    colour = (counts.argmax(-1) + 1).astype(np.uint8)
    small = np.where(occupied, colour, 0).astype(np.uint8)
    return small.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)


def voxel_iou(a: np.ndarray, b: np.ndarray) -> float:
    oa, ob = a > 0, b > 0
    union = np.logical_or(oa, ob).sum()
    return 1.0 if union == 0 else float(np.logical_and(oa, ob).sum() / union)


def color_accuracy(pred: np.ndarray, target: np.ndarray) -> float:
    """Fraction of target-occupied voxels that pred fills with the same colour."""
    occ = target > 0
    return 1.0 if not occ.any() else float((pred[occ] == target[occ]).mean())


# Outward, counter-clockwise quads for each face direction (axis, sign), in unit-voxel corners.
_FACES = {(0, -1): [[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 1, 0]], (0, 1): [[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 1]],
          (1, -1): [[0, 0, 0], [1, 0, 0], [1, 0, 1], [0, 0, 1]], (1, 1): [[0, 1, 0], [0, 1, 1], [1, 1, 1], [1, 1, 0]],
          (2, -1): [[0, 0, 0], [0, 1, 0], [1, 1, 0], [1, 0, 0]], (2, 1): [[0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]]}


def grid_to_faces(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exposed cube faces of a grid -> (vertices float32 (V,3) in world metres, faces (F,3), face RGB (F,3)).

    Vertices are not shared between quads so colours stay exact per face (trimesh would average
    colours of shared vertices). Merge vertices for topology checks (grid_to_mesh(merge=True)).
    """
    r = grid.shape[0]
    occ = grid > 0
    padded = np.pad(occ, 1)
    verts, faces, cols, off = [], [], [], 0
    for (ax, d), quad in _FACES.items():
        neighbour = np.roll(padded, -d, axis=ax)[1:-1, 1:-1, 1:-1]
        idx = np.argwhere(occ & ~neighbour)
        if not len(idx):
            continue
        verts.append((idx[:, None, :] + np.asarray(quad)[None]).reshape(-1, 3))
        i0 = off + 4 * np.arange(len(idx))
        faces.append(np.stack([np.stack([i0, i0 + 1, i0 + 2], 1), np.stack([i0, i0 + 2, i0 + 3], 1)], 1).reshape(-1, 3))
        c = PALETTE_RGB[grid[tuple(idx.T)].astype(np.int64) - 1]
        cols.append(np.repeat(c, 2, axis=0))
        off += 4 * len(idx)
    if not verts:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), np.zeros((0, 3), np.uint8)
    v = (np.concatenate(verts).astype(np.float32) / r) - 0.5
    return v, np.concatenate(faces), np.concatenate(cols)


def grid_to_mesh(grid: np.ndarray, merge: bool = False, smooth: bool = False):
    """Grid -> trimesh.Trimesh with per-face colours. `merge` welds vertices (closed topology, but not
    watertight where voxels meet only along an edge or at a corner; colours then only approximate); `smooth` gives an isosurface (open3d flying edges) coloured by
    the nearest voxel."""
    import trimesh

    if smooth:
        return _isosurface(grid)
    v, f, c = grid_to_faces(grid)
    rgba = np.concatenate([c, np.full((len(c), 1), 255, np.uint8)], 1)
    mesh = trimesh.Trimesh(vertices=v, faces=f, face_colors=rgba, process=merge)
    return mesh


def _isosurface(grid: np.ndarray):
    import open3d as o3d
    import trimesh
    from scipy import ndimage

    r = grid.shape[0]
    occ = np.pad((grid > 0).astype(np.float32), 1)
    occ = ndimage.gaussian_filter(occ, 0.7)
    iso = o3d.t.geometry.TriangleMesh.create_isosurfaces(o3d.core.Tensor(np.ascontiguousarray(occ.transpose(2, 1, 0))), [0.5])
    v = iso.vertex.positions.numpy().astype(np.float32)
    f = iso.triangle.indices.numpy().astype(np.int64)
    if len(f) == 0:
        return trimesh.Trimesh()
    world = (v - 1.0 + 0.5) / r - 0.5  # padded index space -> voxel centres -> metres
    # colour each face by the nearest occupied voxel
    occupied = np.argwhere(grid > 0)
    centres = (occupied + 0.5) / r - 0.5
    from scipy.spatial import cKDTree

    _, nn = cKDTree(centres).query(world[f].mean(1))
    c = PALETTE_RGB[grid[tuple(occupied[nn].T)].astype(np.int64) - 1]
    rgba = np.concatenate([c, np.full((len(c), 1), 255, np.uint8)], 1)
    mesh = trimesh.Trimesh(vertices=world, faces=f, face_colors=rgba, process=False)
    mesh.unmerge_vertices()
    return mesh
