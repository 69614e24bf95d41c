"""Geometry reward terms: model-free checks on the voxel grid (decoded from the mesh tokens, or
voxelised from the GLB when no grid is available). Every metric returns a value in [0, 1],
higher is better; an empty grid is status "empty_mesh" (no number) except for `non_degenerate`,
which scores it 0. Ranges and definitions: docs/rewards.md.

Connectivity is 6-neighbour (face sharing): voxels that touch only along an edge or a corner are
not physically joined.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from rl3d.formats.errors import InputError
from rl3d.formats.glb import read_glb
from rl3d.formats.voxels import grid_to_faces
from rl3d.stages.checks.check import Check, passed
from rl3d.stages.rewards.base import RewardBackend, RewardItem, TermResult

_FACE_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)


def components(occ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """6-connected components -> (labels, sizes[1..n]); sizes[0] is 0 (background)."""
    labels, n = ndimage.label(occ, structure=_FACE_CONNECTIVITY)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return labels, sizes


def largest_component(occ: np.ndarray) -> tuple[float, dict]:
    """Fraction of occupied voxels in the largest connected component (1.0 = one piece)."""
    _, sizes = components(occ)
    return float(sizes.max() / sizes.sum()), {"components": int((sizes > 0).sum())}


def floating_parts(occ: np.ndarray) -> tuple[float, dict]:
    """1 / (1 + n), n = components other than the largest that do not touch the ground layer
    (y = 0). Supported parts beside the main body (two chair legs on the floor) are not floating."""
    labels, sizes = components(occ)
    main = int(sizes.argmax())
    grounded = np.unique(labels[:, 0, :])
    ids = np.flatnonzero(sizes)
    floating = [int(i) for i in ids if i != main and i not in grounded]
    return 1.0 / (1 + len(floating)), {"floating": len(floating), "floating_voxels": int(sizes[floating].sum())}


def ground_contact(occ: np.ndarray) -> tuple[float, dict]:
    """1 / (1 + gap), gap = empty layers between the ground (y = 0) and the lowest voxel."""
    ys = np.flatnonzero(occ.any(axis=(0, 2)))
    gap = int(ys[0])
    return 1.0 / (1 + gap), {"gap_layers": gap}


def stability(occ: np.ndarray, tolerance: float = 4.0) -> tuple[float, dict]:
    """Static stability: is the centre of mass (uniform density) over the support polygon?

    Support polygon = convex hull of the footprint of the lowest occupied layer (where the object
    rests). 1.0 when the projected centre of mass is inside it, else max(0, 1 - d / tolerance)
    with d the distance to the polygon in voxels (a tower leaning past its base scores 0)."""
    idx = np.argwhere(occ).astype(np.float64)
    com = idx[:, [0, 2]].mean(0) + 0.5
    y0 = int(idx[:, 1].min())
    foot = np.argwhere(occ[:, y0, :]).astype(np.float64)
    corners = (foot[:, None, :] + np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float64)[None]).reshape(-1, 2)
    hull = _convex_hull(corners)
    d = _distance_outside(com, hull)
    return float(max(0.0, 1.0 - d / tolerance)), {"com_xz": [float(c) for c in com], "outside_by": float(d)}


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise hull vertices of 2-D points (monotone chain; a single cell is a square)."""
    pts = np.unique(points, axis=0)
    if len(pts) < 3:
        return pts

    def half(ps):
        out: list = []
        for p in ps:
            while len(out) >= 2 and _cross2(out[-1] - out[-2], p - out[-2]) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    return np.array(half(pts) + half(pts[::-1]))


def _cross2(a, b):
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def _distance_outside(p: np.ndarray, hull: np.ndarray) -> float:
    """0 inside a CCW convex polygon, else the distance to its boundary."""
    a, b = hull, np.roll(hull, -1, axis=0)
    e, w = b - a, p[None] - a
    if np.all(e[:, 0] * w[:, 1] - e[:, 1] * w[:, 0] >= -1e-9):
        return 0.0
    t = np.clip((w * e).sum(1) / np.maximum((e * e).sum(1), 1e-12), 0, 1)
    return float(np.sqrt(((a + t[:, None] * e - p[None]) ** 2).sum(1)).min())


def watertight(occ: np.ndarray) -> tuple[float, dict]:
    """Fraction of the merged cube mesh's edges that are manifold (exactly two faces): 1.0 =
    watertight. Voxels meeting only along an edge make 4-face (non-manifold) edges."""

    v, f, _ = grid_to_faces(occ.astype(np.uint8))
    # weld vertices: they sit on the integer lattice, so an exact integer key merges them; keys
    # and edges packed into one int64 each (1-D unique: the same groups as row-wise unique, faster)
    r = occ.shape[0]
    lattice = np.round((v.astype(np.float64) + 0.5) * r).astype(np.int64)
    key = (lattice[:, 0] * (r + 1) + lattice[:, 1]) * (r + 1) + lattice[:, 2]
    _, vid = np.unique(key, return_inverse=True)
    tri = vid.reshape(-1)[f]
    edges = np.sort(np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges[:, 0] * (int(vid.max()) + 1) + edges[:, 1], return_counts=True)
    manifold = float((counts == 2).mean())
    return manifold, {"edges": int(len(counts)), "non_manifold_edges": int((counts != 2).sum())}


def symmetry(occ: np.ndarray) -> tuple[float, dict]:
    """IoU of the occupancy with its mirror image across the x mid-plane of its bounding box
    (left-right symmetry, robust to the object being off-centre)."""
    xs = np.flatnonzero(occ.any(axis=(1, 2)))
    lo, hi = int(xs[0]), int(xs[-1])
    box = occ[lo:hi + 1]
    mirrored = box[::-1]
    inter = np.logical_and(box, mirrored).sum()
    union = np.logical_or(box, mirrored).sum()
    return float(inter / union), {}


def non_degenerate(occ: np.ndarray, min_voxels: int = 8) -> tuple[float, dict]:
    """1.0 for a real solid; 0.0 for an empty grid, fewer than `min_voxels` voxels, or a shape
    one voxel thin along two axes (a stick) or more."""
    n = int(occ.sum())
    if n == 0:
        return 0.0, {"voxels": 0, "reason": "empty"}
    idx = np.argwhere(occ)
    extent = idx.max(0) - idx.min(0) + 1
    if n < min_voxels:
        return 0.0, {"voxels": n, "reason": f"fewer than {min_voxels} voxels"}
    if int((extent <= 1).sum()) >= 2:
        return 0.0, {"voxels": n, "reason": "one voxel thin along two axes"}
    return 1.0, {"voxels": n, "extent": [int(e) for e in extent]}


GEOMETRY_METRICS = {
    "largest_component": largest_component,
    "floating_parts": floating_parts,
    "ground_contact": ground_contact,
    "stability": stability,
    "watertight": watertight,
    "symmetry": symmetry,
    "non_degenerate": non_degenerate,
}


def grid_from_glb(path: str, resolution: int = 32, samples: int = 200_000) -> np.ndarray:
    """Voxelise a GLB in the rl3d frame ([-0.5, 0.5]^3, ground at y = -0.5) -> occupancy grid.

    Area-weighted surface samples, nudged a quarter voxel inwards along their face normal, mark
    the cells the surface bounds; enclosed cells are then filled. Exact for rl3d's cube meshes."""
    import trimesh


    mesh = read_glb(path)
    if isinstance(mesh, trimesh.Scene):
        mesh = mesh.dump(concatenate=True)
    occ = np.zeros((resolution,) * 3, bool)
    if len(getattr(mesh, "faces", [])) == 0:
        return occ.astype(np.uint8)
    pts, fidx = trimesh.sample.sample_surface(mesh, samples, seed=0)
    pts = pts - mesh.face_normals[fidx] * (0.25 / resolution)
    ijk = np.floor((pts + 0.5) * resolution).astype(np.int64)
    ijk = ijk[np.all((ijk >= 0) & (ijk < resolution), axis=1)]
    occ[tuple(ijk.T)] = True
    return ndimage.binary_fill_holes(occ).astype(np.uint8)


class GeometryBackend(RewardBackend):
    """One geometry metric per term: options `metric` (default: the term's own name when that is a
    metric, set by the stage) plus the metric's own keyword options (e.g. tolerance, min_voxels)."""

    name = "geometry"
    needs_views = False
    host_workers = True  # numpy on the grid: worth spreading over processes

    @classmethod
    def default_options(cls, term_name: str) -> dict:
        return {"metric": term_name}  # a term named after its metric (watertight, symmetry, ...)

    @classmethod
    def doctor(cls, options: dict, label: str, unset: dict[str, list[str]], timeout: float) -> list[Check]:
        return [passed(label, "no model needed")]

    def __init__(self, metric: str, **params):
        if metric not in GEOMETRY_METRICS:
            raise InputError(f"unknown geometry metric {metric!r} (known: {', '.join(GEOMETRY_METRICS)})")
        self.metric = metric
        self.params = params
        self.fn = GEOMETRY_METRICS[metric]
        try:  # fail at config time, not per row, on a misspelt parameter
            self.fn(np.ones((2, 2, 2), bool), **params)
        except TypeError as e:
            raise InputError(f"geometry metric {metric!r}: bad options: {e}") from None

    def score(self, items: list[RewardItem]) -> list[TermResult]:
        return [self._one(it) for it in items]

    def _one(self, item: RewardItem) -> TermResult:
        grid = item.grid
        if grid is None and item.mesh_path:
            try:
                grid = grid_from_glb(item.mesh_path)
            except Exception as e:
                return TermResult(status="mesh_error", message=f"{item.mesh_path}: {type(e).__name__}: {e}")
        if grid is None:
            return TermResult(status="no_geometry", message="no decoded grid and no mesh_path")
        occ = np.asarray(grid) > 0
        if not occ.any() and self.metric != "non_degenerate":
            return TermResult(status="empty_mesh", message="the shape has no voxels")
        value, details = self.fn(occ, **self.params)
        return TermResult(value=float(value), details=details)
