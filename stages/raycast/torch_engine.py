"""Ray engine in PyTorch: Moller-Trumbore on any device (CUDA for throughput; CPU works, slowly),
for machines without open3d and for GPU throughput. Two casters share one ray/triangle test:

- cast_meshes (the renderer's): pinhole cameras shared by many meshes. Every triangle of every
  mesh is projected into every view, and only the rays through pixels near its projected box are
  tested against it, all meshes and views of a batch in one flat list of (ray, triangle) pairs:
  no per-mesh Python loop and two host synchronisations per batch.
- cast_rays (any rays, e.g. per-ray origins): rays grouped into 8x8 image tiles and triangles
  into spatially sorted chunks; a cone-vs-sphere test skips (tile, chunk) pairs that cannot meet.

The nearest hit per ray is one int64 key (t bits, triangle id) reduced with a min, so ties go to
the lowest triangle id and the result is deterministic on every device. Both casters test a ray
against a superset of the triangles it can hit, with the same float32 arithmetic, so they return
the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rl3d.stages.policy.device import pick_device
from rl3d.stages.raycast.engines import INVALID_ID, Hits

# Small tiles and chunks cull best: on a 50k-triangle mesh at 6 x 512^2, 8 x 16 leaves ~300M
# ray-triangle tests of the 79G brute-force ones (16 x 64: 1.1G).
RAY_TILE = 8        # rays grouped into 8x8 image tiles (one cone each)
TRI_CHUNK = 16      # triangles per spatially sorted chunk (one bounding sphere each)
CUDA_ELEMENTS = 1 << 26  # ray x triangle tests per batch: ~10 float32 temporaries -> ~2.7 GB on GPU
CPU_ELEMENTS = 1 << 21
_KEY_MISS = (1 << 63) - 1  # int64 max: no hit
# cast_meshes: a ray is tested against a triangle when its pixel centre lies within PIXEL_MARGIN
# pixels of the triangle's projected box. float32 Moller-Trumbore errs by ~1e-3 pixel at 1024^2,
# so half a pixel is a wide safety margin that costs ~4% more tests on 25-pixel voxel faces.
PIXEL_MARGIN = 0.5
CUDA_PAIRS = 1 << 24    # (ray, triangle) pairs tested per step: ~25 live [pairs] temporaries -> ~2.5 GB
CPU_PAIRS = 1 << 20


@dataclass(frozen=True)
class RayTiles:
    """Rays regrouped for this engine: tiles of RAY_TILE^2 rays of one view (padding rays
    have zero direction and never hit), each with a bounding cone (apex = mean origin, axis,
    half angle, origin spread) for culling."""
    rays: object          # torch float32[N, 6, R] (component-major: contiguous slices)
    apex: object          # [N, 3]
    axis: object          # [N, 3] unit
    half_angle: object    # [N] radians
    spread: object        # [N] max distance of a ray origin from the apex
    active: object        # bool[N]: the tile holds at least one real ray
    shared_origin: bool   # every tile's rays share one origin (pinhole cameras): cheaper maths
    shape: tuple          # (V, H, W)
    tile: int


def prepare_rays(rays: np.ndarray, device: str, tile: int = RAY_TILE) -> RayTiles:
    """Rays float32[V, H, W, 6] as tiles with bounding cones on `device` (built once per camera set)."""
    v, h, w, _ = rays.shape
    ts = max(1, min(tile, h, w))
    nh, nw = -(-h // ts), -(-w // ts)
    padded = torch.zeros((v, nh * ts, nw * ts, 6), dtype=torch.float32, device=device)
    padded[:, :h, :w] = torch.from_numpy(np.array(rays, np.float32)).to(device)
    tiles = padded.view(v, nh, ts, nw, ts, 6).permute(0, 1, 3, 2, 4, 5).reshape(v * nh * nw, ts * ts, 6)
    o, d = tiles[..., :3], tiles[..., 3:]
    length = d.norm(dim=-1)
    valid = length > 0
    count = valid.sum(1)
    apex = (o * valid[..., None]).sum(1) / count.clamp(min=1)[:, None]
    spread = ((o - apex[:, None]).norm(dim=-1) * valid).amax(1)
    unit = d / length.clamp(min=1e-30)[..., None]
    axis = (unit * valid[..., None]).sum(1)
    axis = axis / axis.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    cos = torch.where(valid, (unit * axis[:, None]).sum(-1), torch.ones_like(length)).amin(1)
    shared = bool(((o - o[:, :1]).abs().amax(-1) * valid).max() == 0)
    return RayTiles(tiles.transpose(1, 2).contiguous(), apex, axis, torch.arccos(cos.clamp(-1, 1)), spread, count > 0, shared, (v, h, w), ts)


def _morton(q):
    """Interleave the bits of 10-bit integer coordinates int64[F, 3] -> Morton codes int64[F]."""
    def spread(x):
        x = (x | (x << 16)) & 0x030000FF
        x = (x | (x << 8)) & 0x0300F00F
        x = (x | (x << 4)) & 0x030C30C3
        return (x | (x << 2)) & 0x09249249
    return spread(q[:, 0]) | (spread(q[:, 1]) << 1) | (spread(q[:, 2]) << 2)


def _triangle_chunks(verts, faces, chunk: int):
    """Triangles sorted along a Morton curve (so a chunk is spatially compact) and cut into
    chunks: (v0, e1, e2) float32[C, 9, T], original ids int64[C, T] (padding: degenerate
    triangles that never hit), bounding-sphere centres [C, 3] and radii [C]."""
    tri = verts[faces]  # [F, 3 corners, 3]
    centroid = tri.mean(1)
    lo, hi = centroid.amin(0), centroid.amax(0)
    q = ((centroid - lo) / (hi - lo).clamp(min=1e-12) * 1023).long().clamp(0, 1023)
    order = torch.argsort(_morton(q), stable=True)
    nf = len(faces)
    nc = -(-nf // chunk)
    packed = torch.zeros((nc * chunk, 3, 3), dtype=torch.float32, device=verts.device)
    packed[:nf] = tri[order]
    ids = torch.full((nc * chunk,), nf, dtype=torch.int64, device=verts.device)
    ids[:nf] = order
    packed = packed.view(nc, chunk, 3, 3)
    real = (ids < nf).view(nc, chunk)
    big = torch.finfo(torch.float32).max
    corners = packed.reshape(nc, chunk * 3, 3)
    mask3 = real.repeat_interleave(3, 1)[..., None]
    cmin = torch.where(mask3, corners, big).amin(1)
    cmax = torch.where(mask3, corners, -big).amax(1)
    centre = (cmin + cmax) / 2
    radius = torch.where(mask3[..., 0], (corners - centre[:, None]).norm(dim=-1), 0).amax(1)
    v0 = packed[:, :, 0]
    geom = torch.cat([v0, packed[:, :, 1] - v0, packed[:, :, 2] - v0], -1).transpose(1, 2).contiguous()  # [C, 9, T]
    return geom, ids.view(nc, chunk), centre, radius


def _overlapping_pairs(tiles: RayTiles, centre, radius, tile_ids):
    """(tile, chunk) index pairs whose ray cone may meet the chunk's bounding sphere."""
    to = centre[None] - tiles.apex[tile_ids, None]                        # [n, C, 3]
    dist = to.norm(dim=-1)
    reach = radius[None] + tiles.spread[tile_ids, None] + 1e-5 * (1 + dist)
    cos = (to * tiles.axis[tile_ids, None]).sum(-1) / dist.clamp(min=1e-30)
    limit = tiles.half_angle[tile_ids, None] + torch.arcsin((reach / dist.clamp(min=1e-30)).clamp(max=1)) + 1e-4
    meet = (dist <= reach) | (torch.arccos(cos.clamp(-1, 1)) <= limit)
    meet &= tiles.active[tile_ids, None]
    t, c = torch.nonzero(meet, as_tuple=True)
    return tile_ids[t], c


def _nearest_keys(o, d, geom, ids):
    """Moller-Trumbore for rays x triangles -> per ray min of (t bits << 32 | triangle id), an
    int64 key whose minimum is the nearest hit, ties going to the lowest triangle id.
    o: [P, 3, R or 1] (one origin per tile when the rays share it), d: [P, 3, R],
    geom: [P, 9, T] (v0, e1, e2 component-major), ids: [P, T]."""
    dx, dy, dz = (d[:, k, :, None] for k in range(3))                # [P, R, 1]
    ox, oy, oz = (o[:, k, :, None] for k in range(3))                # [P, R or 1, 1]
    v0x, v0y, v0z, e1x, e1y, e1z, e2x, e2y, e2z = (geom[:, None, k] for k in range(9))  # [P, 1, T]
    # Moller-Trumbore's triple products regrouped so that every factor not involving the ray
    # direction is per triangle (per ray only for rays that do not share an origin):
    # det = e1.(d x e2) = d.(e2 x e1), u det = s.(d x e2) = d.(e2 x s), v det = d.(s x e1), t det = e2.(s x e1)
    sx, sy, sz = ox - v0x, oy - v0y, oz - v0z
    nx, ny, nz = e2y * e1z - e2z * e1y, e2z * e1x - e2x * e1z, e2x * e1y - e2y * e1x
    ax, ay, az = e2y * sz - e2z * sy, e2z * sx - e2x * sz, e2x * sy - e2y * sx
    qx, qy, qz = sy * e1z - sz * e1y, sz * e1x - sx * e1z, sx * e1y - sy * e1x
    tq = e2x * qx + e2y * qy + e2z * qz
    det = dx * nx + dy * ny + dz * nz                                 # [P, R, T] from here on
    inv = 1.0 / det
    u = (dx * ax + dy * ay + dz * az) * inv
    v = (dx * qx + dy * qy + dz * qz) * inv
    t = tq * inv
    hit = (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0) & (det.abs() > 1e-12)
    # t > 0 floats order like their int32 bit patterns: one int64 min gives (nearest, lowest id)
    key = (t.view(torch.int32).long() << 32) | ids[:, None, :]
    return torch.where(hit, key, _KEY_MISS).amin(-1)                 # [P, R]


def cast_rays(verts: np.ndarray, faces: np.ndarray, rays, device: str | None = None,
              max_elements: int | None = None) -> Hits:
    """Nearest hits by brute-force Moller-Trumbore in torch, culled per (ray tile, triangle
    chunk) and batched so that at most `max_elements` ray x triangle tests are live at once.
    `rays`: numpy [V, H, W, 6] or prepared RayTiles. Deterministic on every device."""
    tiles = rays if isinstance(rays, RayTiles) else prepare_rays(rays, pick_device(device))
    dev = tiles.rays.device
    budget = max_elements or (CUDA_ELEMENTS if dev.type == "cuda" else CPU_ELEMENTS)
    vt = torch.as_tensor(np.asarray(verts, np.float32)).to(dev)
    ft = torch.as_tensor(np.asarray(faces, np.int64)).to(dev)
    geom, ids, centre, radius = _triangle_chunks(vt, ft, TRI_CHUNK)
    n, r = tiles.rays.shape[0], tiles.rays.shape[2]
    keys = torch.full((n * r,), _KEY_MISS, dtype=torch.int64, device=dev)
    per_pair = r * TRI_CHUNK
    pairs_per_batch = max(1, budget // per_pair)
    tiles_per_cull = max(1, (budget // 4) // max(1, len(centre)))  # bounds the [tiles, chunks] cull arrays
    lane = torch.arange(r, device=dev)
    with torch.no_grad():
        for t0 in range(0, n, tiles_per_cull):
            pt_all, pc_all = _overlapping_pairs(tiles, centre, radius, torch.arange(t0, min(n, t0 + tiles_per_cull), device=dev))
            for b in range(0, len(pt_all), pairs_per_batch):
                pt, pc = pt_all[b:b + pairs_per_batch], pc_all[b:b + pairs_per_batch]
                ray = tiles.rays[pt]  # [P, 6, R]
                o = ray[:, :3, :1] if tiles.shared_origin else ray[:, :3]
                best = _nearest_keys(o, ray[:, 3:], geom[pc], ids[pc])
                keys.scatter_reduce_(0, (pt[:, None] * r + lane).reshape(-1), best.reshape(-1), "amin")
    v, h, w = tiles.shape
    ts = tiles.tile
    nh, nw = -(-h // ts), -(-w // ts)
    keys = keys.view(v, nh, nw, ts, ts).permute(0, 1, 3, 2, 4).reshape(v, nh * ts, nw * ts)[:, :h, :w]
    miss = keys == _KEY_MISS
    t_hit = torch.where(miss, torch.inf, (keys >> 32).to(torch.int32).view(torch.float32))
    pid = torch.where(miss, int(INVALID_ID), keys & 0xFFFFFFFF)
    return Hits(t_hit.cpu().numpy(), pid.cpu().numpy().astype(np.uint32))


# ---- many meshes, shared pinhole cameras ---------------------------------------------------------

@dataclass(frozen=True)
class PinholeCameras:
    """Shared cameras on a device: frames (float64 for projecting, float32 eye for the test) and
    every pixel's ray direction, component-major float32[3, V * S * S] (the numpy rays' bits)."""
    eye: object           # float32[V, 3]
    frames64: object      # float64[V, 4, 3]: eye, right, up, forward
    dirs: object          # float32[3, V * S * S]
    size: int             # S: rays per image side
    half: float           # tan(fov / 2)


def prepare_cameras(frames, rays: np.ndarray, fov: float, device: str) -> PinholeCameras:
    """Cameras (eye, right, up, forward float32[V, 3] each) and their rays float32[V, S, S, 6] on
    `device` (built once per camera set)."""
    v, s = rays.shape[0], rays.shape[1]
    dirs = torch.from_numpy(np.ascontiguousarray(np.asarray(rays)[..., 3:].reshape(v * s * s, 3).T)).to(device)
    f64 = torch.from_numpy(np.stack([np.asarray(a, np.float64) for a in frames], 1)).to(device)
    eye = torch.from_numpy(np.asarray(frames[0], np.float32)).to(device)
    return PinholeCameras(eye, f64, dirs, int(s), float(np.tan(np.radians(fov) / 2)))


def _mesh_batch(meshes, device):
    """Meshes [(verts float32[N, 3], faces [F, 3])] as one triangle list on `device`: corners
    float32[F, 3, 3], the mesh each triangle belongs to and its id inside that mesh, int64[F]."""
    verts = np.concatenate([np.asarray(v, np.float32) for v, _ in meshes])
    base = np.cumsum([0] + [len(v) for v, _ in meshes[:-1]])
    faces = np.concatenate([np.asarray(f, np.int64) + b for (_, f), b in zip(meshes, base)])
    counts = [len(f) for _, f in meshes]
    mesh_of = np.repeat(np.arange(len(meshes)), counts)
    local = np.concatenate([np.arange(c) for c in counts])
    tri = torch.from_numpy(verts).to(device)[torch.from_numpy(faces).to(device)]
    return tri, torch.from_numpy(mesh_of).to(device), torch.from_numpy(local).to(device)


def _pixel_boxes(tri, cams: PinholeCameras):
    """For every (view, triangle): the box of pixels whose rays may hit it, (row0, col0, rows,
    cols) int64[V, F] each (0 rows and cols: no ray can). A triangle reaching behind a camera's
    plane gets the whole image; one wholly behind it gets nothing."""
    s = cams.size
    eye, right, up, fwd = (cams.frames64[:, k] for k in range(4))
    rel = tri.double()[None] - eye[:, None, None]                                  # [V, F, 3, 3]
    z = (rel * fwd[:, None, None]).sum(-1)
    x = (rel * right[:, None, None]).sum(-1)
    y = (rel * up[:, None, None]).sum(-1)
    eps = 1e-6 * (1.0 + eye.norm(dim=-1))[:, None]
    front = z.amin(-1) > eps
    # a triangle with a non-finite corner never passes the test (its factors are inf or nan)
    behind = (z.amax(-1) < -eps) | ~torch.isfinite(tri).all(-1).all(-1)[None]
    zs = torch.where(z > 0, z, 1.0)
    # pixel column j's centre ray passes through x / z = ((j + 0.5) / S * 2 - 1) * tan(fov / 2);
    # rows go down the image: y / z = -(...)
    col = (x / zs / cams.half + 1) * (s / 2) - 0.5
    row = (-y / zs / cams.half + 1) * (s / 2) - 0.5
    c0 = torch.ceil(col.amin(-1) - PIXEL_MARGIN).clamp(0, s)
    c1 = torch.floor(col.amax(-1) + PIXEL_MARGIN).clamp(-1, s - 1)
    r0 = torch.ceil(row.amin(-1) - PIXEL_MARGIN).clamp(0, s)
    r1 = torch.floor(row.amax(-1) + PIXEL_MARGIN).clamp(-1, s - 1)
    c0, r0 = torch.where(front, c0, 0).long(), torch.where(front, r0, 0).long()
    cols = torch.where(front, c1 - c0 + 1, s).clamp(min=0).long()
    rows = torch.where(front, r1 - r0 + 1, s).clamp(min=0).long()
    cols, rows = torch.where(behind, 0, cols), torch.where(behind, 0, rows)
    return r0, c0, rows, cols


def _test_factors(tri, eye):
    """Moller-Trumbore's per (view, triangle) factors, the ones _nearest_keys computes per (tile,
    triangle) for rays of one origin, by the same float32 operations: float32[10, V, F] rows
    n (3), a (3), q (3), t det."""
    v0 = tri[:, 0]
    e1, e2 = tri[:, 1] - v0, tri[:, 2] - v0
    e1x, e1y, e1z = (e1[None, :, k] for k in range(3))                # [1, F]
    e2x, e2y, e2z = (e2[None, :, k] for k in range(3))
    sx, sy, sz = (eye[:, None, k] - v0[None, :, k] for k in range(3))  # [V, F]
    nx, ny, nz = e2y * e1z - e2z * e1y, e2z * e1x - e2x * e1z, e2x * e1y - e2y * e1x
    ax, ay, az = e2y * sz - e2z * sy, e2z * sx - e2x * sz, e2x * sy - e2y * sx
    qx, qy, qz = sy * e1z - sz * e1y, sz * e1x - sx * e1z, sx * e1y - sy * e1x
    tq = e2x * qx + e2y * qy + e2z * qz
    shape = sx.shape
    return torch.stack([a.expand(shape) for a in (nx, ny, nz, ax, ay, az, qx, qy, qz, tq)])


def _pair_keys(d, f, ids):
    """_nearest_keys' test for one ray and one triangle per pair: d float32[3, P] directions,
    f float32[10, P] factors (_test_factors), ids int64[P] -> key int64[P] (_KEY_MISS: no hit)."""
    dx, dy, dz = d[0], d[1], d[2]
    nx, ny, nz, ax, ay, az, qx, qy, qz, tq = (f[k] for k in range(10))
    det = dx * nx + dy * ny + dz * nz
    inv = 1.0 / det
    u = (dx * ax + dy * ay + dz * az) * inv
    v = (dx * qx + dy * qy + dz * qz) * inv
    t = tq * inv
    hit = (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0) & (det.abs() > 1e-12)
    key = (t.view(torch.int32).long() << 32) | ids
    return torch.where(hit, key, _KEY_MISS)


def cast_meshes(meshes, cams: PinholeCameras, max_pairs: int | None = None, solids=None):
    """Nearest-hit keys int64[B, V, S, S] (t bits << 32 | triangle id inside its mesh; _KEY_MISS
    where no triangle is hit) of every camera ray against each of `meshes` [(verts float32[N, 3],
    faces [F, 3])], all at once: the pixels of each (view, triangle)'s box are tested in steps of
    at most `max_pairs` (ray, triangle) pairs. Two host synchronisations (the pair count), none
    per step. keys_to_hits turns keys into t and triangle ids. `solids`: per mesh its
    renderer.solid_winding; a solid's faces turned away from a camera are not tested in that view
    (about half the pairs), since a ray from outside meets a face turned towards it first."""
    dev = cams.dirs.device
    nv, s = cams.eye.shape[0], cams.size
    keys = torch.full((len(meshes) * nv * s * s,), _KEY_MISS, dtype=torch.int64, device=dev)
    with torch.no_grad():
        tri, mesh_of, local = _mesh_batch(meshes, dev)
        r0, c0, rows, cols = (a.reshape(-1) for a in _pixel_boxes(tri, cams))   # [V * F], view-major
        count = rows * cols
        if solids is not None and any(solids):
            winding = torch.tensor([int(w) for w in solids], dtype=torch.float64, device=dev)[mesh_of]
            count = torch.where(_turned_away(tri, cams.eye, winding).reshape(-1), 0, count)
        live = torch.nonzero(count).squeeze(1)                                    # host sync
        if len(live) == 0:
            return keys.view(len(meshes), nv, s, s)
        nf = len(tri)
        view, face = live // nf, live % nf
        factors = _test_factors(tri, cams.eye).reshape(10, -1)[:, live]
        count = count[live]
        ends = torch.cumsum(count, 0)
        total = int(ends[-1])                                                     # host sync
        # per live item: its first pair, box and where its pixels sit among the rays and keys
        ints = torch.stack([ends - count, cols[live], r0[live], c0[live], view * s * s,
                            (mesh_of[face] * nv + view) * s * s, local[face]])
        step = max_pairs or (CUDA_PAIRS if dev.type == "cuda" else CPU_PAIRS)
        for p0 in range(0, total, step):
            p = torch.arange(p0, min(total, p0 + step), device=dev)
            item = torch.searchsorted(ends, p, right=True)
            first, width, row0, col0, ray0, key0, ids = ints[:, item]
            off = p - first
            r = torch.div(off, width, rounding_mode="floor")
            pixel = (row0 + r) * s + col0 + (off - r * width)
            best = _pair_keys(cams.dirs[:, ray0 + pixel], factors[:, item], ids)
            keys.scatter_reduce_(0, key0 + pixel, best, "amin")
    return keys.view(len(meshes), nv, s, s)


def _turned_away(tri, eye, winding):
    """bool[V, F]: the triangle faces away from the view's camera, clearly (not edge-on), given its
    solid's winding (1 outward, -1 inward, 0: never). For a pinhole camera every ray's
    Moller-Trumbore determinant has the sign of (v0 - eye) . (e2 x e1), positive on a face turned
    towards the camera when the solid is wound outward; float64 here, a relative margin of 1e-6."""
    t = tri.double()
    v0, e1, e2 = t[:, 0], t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    n = torch.cross(e2, e1, dim=-1)                                           # [F, 3]
    rel = v0[None] - eye.double()[:, None]                                    # [V, F, 3]
    facing = (rel * n[None]).sum(-1) * winding[None]
    margin = 1e-6 * rel.norm(dim=-1) * n.norm(dim=-1)[None]
    return (winding[None] != 0) & (facing < -margin)


def keys_to_hits(keys):
    """Nearest-hit keys -> (t float32, inf on a miss; triangle id int64, INVALID_ID on a miss), torch."""
    miss = keys == _KEY_MISS
    t_hit = torch.where(miss, torch.inf, (keys >> 32).to(torch.int32).view(torch.float32))
    return t_hit, torch.where(miss, int(INVALID_ID), keys & 0xFFFFFFFF)
