"""Geometric probes that read counts and properties back from an occupancy grid (bool[x,y,z]).

Families name which probe checks which of their parameters; the spec checker runs them on any
grid (ground truth or model output), so they only assume the shape-world conventions: +Y up,
resting on y = 0, centred in x/z.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), bool)


def components_2d(mask: np.ndarray, min_size: int = 1) -> int:
    lab, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0 or min_size <= 1:
        return int(n)
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    return int((sizes >= min_size).sum())


def ground_contacts(occ: np.ndarray, layers: int = 1) -> int:
    """Separate footprints on the ground (legs, piers, pillars, wheels, stems)."""
    return components_2d(occ[:, :layers, :].any(1))


def y_extent(occ: np.ndarray) -> tuple[int, int]:
    ys = np.flatnonzero(occ.any((0, 2)))
    return (int(ys[0]), int(ys[-1]) + 1) if len(ys) else (0, 0)


def width_profile(occ: np.ndarray) -> np.ndarray:
    """Max of x-extent and z-extent of each horizontal layer (0 where empty)."""
    out = np.zeros(occ.shape[1], np.int32)
    for y in np.flatnonzero(occ.any((0, 2))):
        xs, zs = np.flatnonzero(occ[:, y, :].any(1)), np.flatnonzero(occ[:, y, :].any(0))
        out[y] = max(xs[-1] - xs[0] + 1, zs[-1] - zs[0] + 1)
    return out


def runs(values: np.ndarray) -> list[tuple[int, int, int]]:
    """(value, start, length) of maximal runs of equal values."""
    out, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append((int(values[start]), start, i - start))
            start = i
    return out


def profile_steps(occ: np.ndarray) -> int:
    """Number of runs of constant layer width over the object's height (stacked blocks)."""
    w = width_profile(occ)
    y0, y1 = y_extent(occ)
    return len(runs(w[y0:y1]))


def profile_peaks(occ: np.ndarray, min_prominence: int = 1) -> int:
    """Runs of layers wider than both neighbouring runs (ledges, slabs, balls)."""
    w = width_profile(occ)
    y0, y1 = y_extent(occ)
    rs = runs(w[y0:y1])
    n = 0
    for i, (v, _, _) in enumerate(rs):
        below = rs[i - 1][0] if i > 0 else 0
        above = rs[i + 1][0] if i + 1 < len(rs) else 0
        if v - below >= min_prominence and v - above >= min_prominence:
            n += 1
    return n


def width_maxima(occ: np.ndarray, smooth: float = 0.0) -> int:
    """Local maxima of the per-layer occupied area (stacked balls), plateaus counted once."""
    area = occ.sum((0, 2)).astype(np.float64)
    y0, y1 = y_extent(occ)
    rs = runs(area[y0:y1].astype(np.int64))
    n = 0
    for i, (v, _, _) in enumerate(rs):
        below = rs[i - 1][0] if i > 0 else -1
        above = rs[i + 1][0] if i + 1 < len(rs) else -1
        n += v > below and v > above
    return n


def height_plateaus(occ: np.ndarray) -> int:
    """Distinct top heights along z (the steps of a staircase rising toward -Z)."""
    cols = occ.any(0)  # [y, z]
    has = cols.any(0)
    top = np.where(has, cols.shape[0] - np.argmax(cols[::-1], axis=0), 0)
    return len(runs(top[has]))


def slice_components_max(occ: np.ndarray, lo: float = 0.35, hi: float = 0.95, min_size: int = 2) -> int:
    """Max number of separate pieces in a horizontal slice within a height band (cactus arms)."""
    y0, y1 = y_extent(occ)
    h = y1 - y0
    best = 0
    for y in range(y0 + int(lo * h), y0 + max(int(hi * h), int(lo * h) + 1)):
        best = max(best, components_2d(occ[:, y, :], min_size))
    return best


def vertical_runs(column: np.ndarray) -> int:
    """Number of occupied runs in a 1-D column."""
    c = column.astype(np.int8)
    return int(((c[1:] == 1) & (c[:-1] == 0)).sum() + c[0])


def hollowness(occ: np.ndarray) -> float:
    """Fraction of the filled volume that is enclosed empty space. A voxel counts as enclosed when
    the 2-D slice through it along any axis surrounds it (so one opening does not empty a shell)."""
    solid = occ.copy()
    for ax in range(3):
        moved = np.moveaxis(occ, ax, 0)
        filled = np.stack([ndimage.binary_fill_holes(sl) if sl.any() else sl for sl in moved])
        solid |= np.moveaxis(filled, 0, ax)
    tot = solid.sum()
    return 0.0 if tot == 0 else float((solid & ~occ).sum() / tot)


def thin_rods(occ: np.ndarray) -> bool:
    """True when no 3x3x3 solid block exists anywhere (a wireframe of thin rods)."""
    return bool(occ.any()) and not ndimage.binary_erosion(occ, np.ones((3, 3, 3), bool)).any()


def center_over_footprint(occ: np.ndarray, tol: float = 0.5) -> bool:
    """Centre of mass (x, z) inside the convex hull of the ground footprint, +tol voxels."""
    pts = np.argwhere(occ)
    foot = np.argwhere(occ[:, 0, :]).astype(np.float64)
    if not len(pts) or not len(foot):
        return False
    com = pts[:, [0, 2]].mean(0)
    return point_in_hull(com, foot, tol)


def point_in_hull(p: np.ndarray, pts: np.ndarray, tol: float) -> bool:
    # voxel footprints are squares: use their corners so a single column has area
    corners = (pts[:, None, :] + np.array([[-.5, -.5], [-.5, .5], [.5, -.5], [.5, .5]])[None]).reshape(-1, 2)
    lo, hi = corners.min(0), corners.max(0)
    if np.any(p < lo - tol) or np.any(p > hi + tol):
        return False
    if np.any(hi - lo < 1e-6):
        return True
    from scipy.spatial import ConvexHull

    try:
        hull = ConvexHull(corners)
    except Exception:
        return True
    # hull.equations: n.x + d <= 0 inside; allow tol
    return bool((hull.equations[:, :2] @ p + hull.equations[:, 2] <= tol).all())


def stable_cuts(occ: np.ndarray, tol: float = 0.5) -> bool:
    """Every horizontal cut: the part above has its centre of mass over the cut's support hull."""
    ys = np.flatnonzero(occ.any((0, 2)))
    if not len(ys):
        return False
    counts = occ.sum((0, 2))
    xs = np.einsum("xyz,x->y", occ, np.arange(occ.shape[0], dtype=np.float64))
    zs = np.einsum("xyz,z->y", occ, np.arange(occ.shape[2], dtype=np.float64))
    above_n = np.cumsum(counts[::-1])[::-1]
    above_x = np.cumsum(xs[::-1])[::-1]
    above_z = np.cumsum(zs[::-1])[::-1]
    for y in ys:
        if y + 1 >= occ.shape[1] or above_n[y + 1] == 0:
            break
        com = np.array([above_x[y + 1], above_z[y + 1]]) / above_n[y + 1]
        support = np.argwhere(occ[:, y, :] & occ[:, y + 1, :]).astype(np.float64)
        if not len(support):
            support = np.argwhere(occ[:, y, :]).astype(np.float64)
        if not point_in_hull(com, support, tol):
            return False
    return True


def floating_parts(occ: np.ndarray) -> int:
    """Connected pieces (26-connectivity) that do not touch the ground."""
    lab, n = ndimage.label(occ, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return 0
    grounded = set(np.unique(lab[:, 0, :])) - {0}
    return int(n - len(grounded))


def profile_steps_any(occ: np.ndarray) -> int:
    """Layers change footprint at each new plank: runs of identical occupied footprints."""
    y0, y1 = y_extent(occ)
    n, prev = 0, None
    for y in range(y0, y1):
        cur = occ[:, y, :]
        if prev is None or not np.array_equal(cur, prev):
            n += 1
        prev = cur
    return n
