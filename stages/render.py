"""`rl3d render`: headless multi-view renders of meshes (ray casting, deterministic).

Two ray-casting backends give the hits (t_hit, primitive id) of the rays of ALL views of a
mesh in one batched call; everything else (cameras, shading, files) is shared numpy code:
- "open3d": open3d's RaycastingScene (Embree BVH on the CPU, no GL needed);
- "torch": Moller-Trumbore in PyTorch on any device (CUDA for throughput; CPU works, slowly),
  with rays grouped into 8x8 image tiles and triangles into spatially sorted chunks, and a
  cone-vs-sphere test that skips (tile, chunk) pairs that cannot meet. For machines without
  open3d (its wheel is large) and for GPU throughput.
"auto" picks open3d when it is installed, else torch. Both agree on all but edge pixels.

Our meshes are flat-coloured (one palette colour per face),
so a face's shade in a view depends only on (view, face): we build a small per-view look-up
table of shaded face colours and gather it by the hit primitive id, which is much cheaper than
shading every pixel. Lighting, in the camera frame so every view is lit alike: ambient +
Lambert headlight + a key light from the upper left; faces are two-sided.

Cameras have +Y up. Framing "object" (default) looks at the centre of the mesh's bounding box
from where the box fills ~80% of the frame; framing "cube" looks at the origin from the
smallest distance at which the unit cube [-0.5, 0.5]^3 (the voxel grid) fits every view, so
sizes compare across meshes. Azimuth 0 looks at the object's front (camera on +Z),
azimuth 90 looks from +X (the object's left); elevation > 0 looks down from above.

Outputs per mesh (under the stage out dir): images/<sample_id>/view-XX.png, optional
depth-XX.png (uint16 z-depth in millimetres, 0 = background) and normal-XX.png (camera-space
normals, x right, y up, z towards the camera, as (n + 1) / 2 * 255; background 0), and sheet.png,
a captioned contact sheet of the views for people.
"""
from __future__ import annotations

import functools
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rl3d.formats.errors import InputError
from rl3d.stages.policy.device import pick_device

DEFAULT_ELEVATION = 20.0
DEFAULT_FOV = 40.0
FIT_MARGIN = 1.04  # framing "cube": the unit cube's silhouette fills at most 1/1.04 of the frame
OBJECT_FILL = 0.8  # framing "object": the mesh's bounding box fills at most 80% of the frame
FRAMINGS = ("object", "cube")
AMBIENT, HEADLIGHT, KEY = 0.35, 0.50, 0.30
KEY_DIR_CAM = np.array([-0.45, 0.75, 0.5], np.float32)  # towards the key light: upper left, in front
PRESETS = ("default", "orbit")
COPY_COLUMNS = ("prompt_id", "level", "sample_index", "prompt")


@dataclass(frozen=True)
class RenderOptions:
    views: int = 6
    preset: str = "default"
    elevation: float = DEFAULT_ELEVATION
    resolution: int = 512
    background: str = "white"
    fov: float = DEFAULT_FOV
    depth: bool = False
    normals: bool = False
    sheet: bool = True
    framing: str = "object"
    backend: str = "open3d"      # resolved: "open3d" or "torch"
    device: str | None = None    # torch backend only; not part of the output's config



# ---- cameras --------------------------------------------------------------------------------

def view_angles(views: int = 6, preset: str = "default", elevation: float = DEFAULT_ELEVATION):
    """(azimuths, elevations) in degrees, float32[V]. default: `views` evenly spaced azimuths at
    one elevation, starting 30 degrees off the front (3/4 view); orbit: 8 azimuths at 10 degrees
    and 8 at 40 degrees, the upper ring turned by 22.5 degrees."""
    if preset == "orbit":
        az = np.concatenate([np.arange(8) * 45.0, np.arange(8) * 45.0 + 22.5])
        el = np.concatenate([np.full(8, 10.0), np.full(8, 40.0)])
    elif preset == "default":
        if views < 1:
            raise InputError(f"--views {views}: need at least one view")
        az = (30.0 + np.arange(views) * 360.0 / views) % 360.0
        el = np.full(views, float(elevation))
    else:
        raise InputError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    return az.astype(np.float32), el.astype(np.float32)


def fit_distance(fov: float, azimuths, elevations, margin: float = FIT_MARGIN, half_extents=(0.5, 0.5, 0.5)) -> float:
    """Smallest camera distance at which all 8 corners of a centred box (default: the unit cube)
    lie inside every view, the box's silhouette filling at most 1/margin of the frame: one
    distance for all views."""
    _, right, up, fwd = camera_frames(azimuths, elevations, 1.0)
    h = np.asarray(half_extents, np.float64)
    corners = np.array(np.meshgrid(*[[-e, e] for e in h], indexing="ij")).reshape(3, -1).T
    x, y, z = np.abs(corners @ right.T), np.abs(corners @ up.T), corners @ fwd.T  # [8, V]
    # corner inside the frustum: max(|x|, |y|) <= tan(fov/2) / margin * (distance + z)
    t = math.tan(math.radians(fov) / 2) / margin
    return float(np.max(np.maximum(x, y) / t - z))


def camera_frames(azimuths, elevations, distance: float):
    """Eye positions and (right, up, forward) unit vectors, float32[V, 3] each."""
    az, el = np.radians(np.asarray(azimuths, np.float64)), np.radians(np.asarray(elevations, np.float64))
    eye = distance * np.stack([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)], -1)
    fwd = -eye / np.linalg.norm(eye, axis=-1, keepdims=True)
    right = np.cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right, axis=-1, keepdims=True)  # elevation is never +-90 here
    up = np.cross(right, fwd)
    return tuple(a.astype(np.float32) for a in (eye, right, up, fwd))


def camera_rays(eye, right, up, fwd, resolution: int, fov: float) -> np.ndarray:
    """float32[V, H, W, 6] pinhole rays. Directions have unit forward component, so the hit
    distance open3d returns is the z-depth."""
    half = math.tan(math.radians(fov) / 2)
    s = ((np.arange(resolution, dtype=np.float32) + 0.5) / resolution * 2 - 1) * half
    n = len(eye)
    rays = np.empty((n, resolution, resolution, 6), np.float32)
    rays[..., :3] = eye[:, None, None, :]
    # direction = fwd + u * right + v * up, with image x to the right and image y down
    horiz = fwd[:, None, :] + s[None, :, None] * right[:, None, :]  # [V, W, 3]
    np.add(horiz[:, None, :, :], -s[None, :, None, None] * up[:, None, None, :], out=rays[..., 3:])
    return rays


@functools.lru_cache(maxsize=4)
def _cached_cameras(az: tuple, el: tuple, resolution: int, fov: float):
    """Camera frames and rays (read-only numpy); every mesh of a render run shares the same cameras."""
    frames = camera_frames(az, el, fit_distance(fov, az, el))
    rays = camera_rays(*frames, resolution, fov)
    rays.setflags(write=False)
    return frames, rays


# ---- rendering --------------------------------------------------------------------------------

def mesh_arrays(mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices float32[N,3], faces uint32[F,3], face colours uint8[F,3] of a trimesh mesh."""
    from rl3d.formats.glb import face_rgb

    v = np.asarray(mesh.vertices, np.float32)
    f = np.asarray(mesh.faces, np.int64)
    if len(f) == 0:
        raise ValueError("mesh holds no triangles")
    return v, f.astype(np.uint32), face_rgb(mesh)


def face_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    ln = np.linalg.norm(n, axis=1, keepdims=True)
    return np.divide(n, ln, out=np.zeros_like(n), where=ln > 0)


def parse_color(text) -> tuple[int, int, int]:
    """A colour name or hex (#fff, #ffffff) or an (r, g, b) tuple -> (r, g, b)."""
    if isinstance(text, (tuple, list)):
        return tuple(int(c) for c in text[:3])
    from PIL import ImageColor

    try:
        return ImageColor.getrgb(str(text))[:3]
    except ValueError:
        raise InputError(f"--background {text!r}: not a colour name or hex (#rrggbb)") from None


def object_scale(verts: np.ndarray, fov: float, az, el) -> tuple[np.ndarray, float]:
    """Centre and scale that make the mesh's bounding box fill OBJECT_FILL of the frame when
    seen by the unit-cube cameras (scaling the object = moving the camera closer)."""
    lo, hi = verts.min(0), verts.max(0)
    half = np.maximum((hi - lo) / 2, 1e-6)
    cube = fit_distance(fov, az, el)
    return (lo + hi) / 2, cube / fit_distance(fov, az, el, 1 / OBJECT_FILL, half)


# ---- ray-casting backends -------------------------------------------------------------------
# A backend casts rays float32[V, H, W, 6] (origin, direction) against one triangle mesh and
# returns (t_hit float32[V, H, W], primitive id uint32[V, H, W]) with INVALID_ID where a ray
# misses; t is in units of the direction's length (our directions have unit forward component,
# so t is the z-depth).

BACKENDS = ("auto", "open3d", "torch")
INVALID_ID = np.uint32(0xFFFFFFFF)  # open3d's RaycastingScene.INVALID_ID


def open3d_available() -> bool:
    """True when open3d is installed (checked without importing it: the import is slow)."""
    import importlib.util

    return importlib.util.find_spec("open3d") is not None


def resolve_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise InputError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "open3d" if open3d_available() else "torch"
    if backend == "open3d" and not open3d_available():
        raise InputError("--backend open3d: open3d is not installed here (use --backend torch)")
    return backend


@functools.lru_cache(maxsize=4)
def _open3d_rays(az: tuple, el: tuple, resolution: int, fov: float):
    import open3d as o3d

    return o3d.core.Tensor(np.array(_cached_cameras(az, el, resolution, fov)[1]))


def cast_rays_open3d(verts: np.ndarray, faces: np.ndarray, rays) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hits with open3d's Embree scene; `rays` numpy or an open3d tensor."""
    import open3d as o3d

    scene = o3d.t.geometry.RaycastingScene()
    scene.add_triangles(o3d.core.Tensor(verts), o3d.core.Tensor(faces))
    hits = scene.cast_rays(rays if isinstance(rays, o3d.core.Tensor) else o3d.core.Tensor(rays))
    return hits["t_hit"].numpy(), hits["primitive_ids"].numpy()


# Small tiles and chunks cull best: on a 50k-triangle mesh at 6 x 512^2, 8 x 16 leaves ~300M
# ray-triangle tests of the 79G brute-force ones (16 x 64: 1.1G).
RAY_TILE = 8        # torch backend: rays grouped into 8x8 image tiles (one cone each)
TRI_CHUNK = 16      # torch backend: triangles per spatially sorted chunk (one bounding sphere each)
CUDA_ELEMENTS = 1 << 26  # ray x triangle tests per batch: ~10 float32 temporaries -> ~2.7 GB on GPU
CPU_ELEMENTS = 1 << 21
_KEY_MISS = (1 << 63) - 1  # int64 max: no hit


@dataclass(frozen=True)
class RayTiles:
    """Rays regrouped for the torch backend: tiles of RAY_TILE^2 rays of one view (padding rays
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


def prepare_ray_tiles(rays: np.ndarray, device: str, tile: int = RAY_TILE) -> RayTiles:
    import torch

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


@functools.lru_cache(maxsize=4)
def _torch_rays(az: tuple, el: tuple, resolution: int, fov: float, device: str) -> RayTiles:
    return prepare_ray_tiles(_cached_cameras(az, el, resolution, fov)[1], device)


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
    import torch

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
    import torch

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
    import torch

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


def cast_rays_torch(verts: np.ndarray, faces: np.ndarray, rays, device: str | None = None,
                    max_elements: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hits by brute-force Moller-Trumbore in torch, culled per (ray tile, triangle
    chunk) and batched so that at most `max_elements` ray x triangle tests are live at once.
    `rays`: numpy [V, H, W, 6] or prepared RayTiles. Deterministic on every device."""
    import torch

    tiles = rays if isinstance(rays, RayTiles) else prepare_ray_tiles(rays, pick_device(device))
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
    return t_hit.cpu().numpy(), pid.cpu().numpy().astype(np.uint32)


def cast_camera_rays(verts, faces, az: tuple, el: tuple, resolution: int, fov: float, backend: str,
                     device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The hits of the shared cameras' rays with the chosen (resolved) backend."""
    if backend == "open3d":
        return cast_rays_open3d(verts, faces, _open3d_rays(az, el, resolution, fov))
    return cast_rays_torch(verts, faces, _torch_rays(az, el, resolution, fov, pick_device(device)))


def render_views(mesh, azimuths, elevations, resolution: int = 512, fov: float = DEFAULT_FOV,
                 background="white", *, framing: str = "object", with_normals: bool = True,
                 backend: str = "auto", device: str | None = None) -> dict:
    """Render all views of one mesh with one batched ray cast.

    framing "object": cameras look at the centre of the mesh's bounding box from the distance
    at which the box fills ~80% of the frame (sizes are normalised, as in most 3D evals);
    "cube": cameras look at the origin from the distance at which the unit cube fits, so
    sizes compare across meshes. +Y is up in both.
    backend "open3d" (Embree, CPU), "torch" (on `device`, default cuda when available) or
    "auto" (open3d when installed, else torch); only the ray hits differ, shading is shared.
    Returns rgb uint8[V,H,W,3], depth float32[V,H,W] (z-depth in mesh units, 0 where empty),
    normal float32[V,H,W,3] (camera space, 0 where empty; None unless with_normals) and mask
    bool[V,H,W].
    """
    if framing not in FRAMINGS:
        raise InputError(f"--framing {framing!r}: expected one of {', '.join(FRAMINGS)}")
    backend = resolve_backend(backend)
    verts, faces, colours = mesh_arrays(mesh)
    az = tuple(float(a) for a in np.atleast_1d(azimuths))
    el = tuple(float(e) for e in np.atleast_1d(elevations))
    (eye, right, up, fwd), _ = _cached_cameras(az, el, int(resolution), float(fov))
    scale = 1.0
    if framing == "object":  # the same rays for every mesh: move and scale the mesh instead
        centre, scale = object_scale(verts, fov, az, el)
        verts = ((verts - centre) * scale).astype(np.float32)
    nviews, nf = len(eye), len(faces)
    depth, pid = cast_camera_rays(verts, faces, az, el, int(resolution), float(fov), backend, device)
    mask = pid != INVALID_ID
    depth[~mask] = 0
    if scale != 1.0:
        depth /= np.float32(scale)  # back to mesh units

    # camera-space face normals per view, turned towards the camera (two-sided faces)
    fn = face_normals(verts, faces)
    cam = np.stack([fn @ right.T, fn @ up.T, -(fn @ fwd.T)], -1).transpose(1, 0, 2)  # [V, F, 3]
    cam *= np.where(cam[..., 2:3] < 0, -1.0, 1.0).astype(np.float32)
    key = KEY_DIR_CAM / np.linalg.norm(KEY_DIR_CAM)
    shade = AMBIENT + HEADLIGHT * cam[..., 2] + KEY * np.maximum(cam @ key, 0)  # [V, F]
    # shaded face colours per view as packed RGBA uint32 (one 4-byte gather per pixel);
    # last row of each view: the background
    lut = np.empty((nviews, nf + 1, 4), np.uint8)
    lut[:, :nf, :3] = np.clip(colours[None].astype(np.float32) * shade[..., None], 0, 255).round()
    lut[:, nf, :3] = parse_color(background)
    lut[..., 3] = 255
    # flat look-up index per pixel: view * (F + 1) + primitive id (background -> F)
    idx = pid
    idx[~mask] = nf
    idx += (np.arange(nviews, dtype=np.uint32) * np.uint32(nf + 1))[:, None, None]
    rgba = lut.view(np.uint32).reshape(-1).take(idx)
    rgb = np.ascontiguousarray(rgba.view(np.uint8).reshape(*idx.shape, 4)[..., :3])
    normal = None
    if with_normals:
        normal_lut = np.concatenate([cam.astype(np.float32), np.zeros((nviews, 1, 3), np.float32)], 1)
        normal = normal_lut.reshape(-1, 3)[idx]
    return {"rgb": rgb, "depth": depth, "normal": normal, "mask": mask}


# ---- files ------------------------------------------------------------------------------------

def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    from rl3d.formats.shards import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def contact_sheet(rgb: np.ndarray, caption: str, labels: list[str], background, tile: int = 256) -> np.ndarray:
    """Views on a grid (3x2 for 6 views) under a caption bar, uint8[H, W, 3]."""
    from PIL import Image, ImageDraw, ImageFont

    n = len(rgb)
    rows = max(1, math.ceil(math.sqrt(n / 1.5)))
    cols = math.ceil(n / rows)
    bar, pad = 30, 4
    bg = parse_color(background)
    sheet = Image.new("RGB", (cols * tile + (cols + 1) * pad, bar + rows * tile + (rows + 1) * pad), bg)
    draw = ImageDraw.Draw(sheet)
    small = ImageFont.load_default(size=12)
    for i, img in enumerate(rgb):
        x, y = pad + (i % cols) * (tile + pad), bar + pad + (i // cols) * (tile + pad)
        sheet.paste(Image.fromarray(img).resize((tile, tile), Image.Resampling.LANCZOS), (x, y))
        draw.text((x + 4, y + tile - 16), labels[i], fill=(110, 110, 110), font=small)
    draw.rectangle([0, 0, sheet.width, bar - 1], fill=(40, 40, 40))
    font = ImageFont.load_default(size=15)
    text = caption
    while len(text) > 4 and draw.textlength(text, font=font) > sheet.width - 16:
        text = text[:-4] + "..."
    draw.text((8, 7), text, fill=(255, 255, 255), font=font)
    return np.asarray(sheet)


def _safe_dir_name(sample_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in sample_id) or "_"


def render_one(job: dict, out: str, opts: RenderOptions) -> list[dict]:
    """Render one mesh job (a dict: sample_id, mesh_path, status, message, copied keys) into
    rows of the renders table, one per view. Errors become rows, never exceptions."""
    rows, res = render_job(job, opts)
    return write_job(job, rows, res, out, opts)


def render_job(job: dict, opts: RenderOptions) -> tuple[list[dict], dict | None]:
    """The rows of one mesh job and its rendered arrays (None when the job failed: the rows
    then carry the status and message)."""
    az, el = view_angles(opts.views, opts.preset, opts.elevation)
    base = {k: job[k] for k in COPY_COLUMNS if k in job}
    rows = [{"sample_id": job["sample_id"], "view": i, "azimuth": float(az[i]), "elevation": float(el[i]),
             "image_path": "", "status": "ok", "message": "", **base} for i in range(len(az))]
    for r in rows:
        r.update({"depth_path": "", "normal_path": ""} if opts.depth or opts.normals else {})
        if opts.sheet:
            r["sheet_path"] = ""

    def fail(status, message):
        for r in rows:
            r.update(status=status, message=message)
        return rows, None

    if job.get("status", "ok") != "ok":
        return fail(job["status"], f"upstream {job['status']}: {job.get('message') or ''}".strip())
    if not job.get("mesh_path"):
        return fail("render_error", "no mesh_path")
    try:
        from rl3d.formats.glb import read_glb

        mesh = read_glb(job["mesh_path"])
        res = render_views(mesh, az, el, opts.resolution, opts.fov, opts.background, framing=opts.framing,
                           with_normals=opts.normals, backend=opts.backend, device=opts.device)
    except Exception as e:  # corrupt GLB, empty mesh, degenerate geometry
        return fail("render_error", f"{type(e).__name__}: {e}"[:500])
    return rows, res


def write_job(job: dict, rows: list[dict], res: dict | None, out: str, opts: RenderOptions) -> list[dict]:
    """Write a rendered job's PNGs (views, optional depth/normals, sheet) and fill in the rows' paths."""
    if res is None:
        return rows
    az, el = [r["azimuth"] for r in rows], [r["elevation"] for r in rows]
    rel = Path("images") / _safe_dir_name(job["sample_id"])
    for i, r in enumerate(rows):
        r["image_path"] = str(rel / f"view-{i:02d}.png")
        _save_png(res["rgb"][i], Path(out) / r["image_path"])
        if opts.depth:
            r["depth_path"] = str(rel / f"depth-{i:02d}.png")
            mm = np.clip(np.round(res["depth"][i] * 1000), 0, 65535).astype(np.uint16)
            _save_png(mm, Path(out) / r["depth_path"])
        if opts.normals:
            r["normal_path"] = str(rel / f"normal-{i:02d}.png")
            nrm = np.where(res["mask"][i][..., None], np.round((res["normal"][i] + 1) * 127.5), 0)
            _save_png(np.clip(nrm, 0, 255).astype(np.uint8), Path(out) / r["normal_path"])
    if opts.sheet:
        caption = job["sample_id"] + (f"  |  {job['prompt']}" if job.get("prompt") else "")
        labels = [f"az {a:.0f}  el {e:.0f}" for a, e in zip(az, el)]
        sheet_rel = str(rel / "sheet.png")
        _save_png(contact_sheet(res["rgb"], caption, labels, opts.background), Path(out) / sheet_rel)
        for r in rows:
            r["sheet_path"] = sheet_rel
    return rows


# ---- inputs -----------------------------------------------------------------------------------

def read_jobs(samples: str | os.PathLike) -> list[dict]:
    """Mesh jobs from a samples/objects table (needs sample_id + mesh_path) or a dir of GLBs."""
    p = Path(samples)
    if p.is_dir() and not any(p.glob("*.parquet")) and any(p.glob("*.glb")):
        return [{"sample_id": g.stem, "mesh_path": str(g.resolve()), "status": "ok", "message": ""}
                for g in sorted(p.glob("*.glb"))]
    from rl3d.formats.tables import absolute_media, list_parts

    jobs, seen = [], set()
    for f in list_parts(p):
        try:
            names = pq.read_schema(f).names
        except Exception as e:
            raise InputError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        for need in ("sample_id", "mesh_path"):
            if need not in names:
                raise InputError(f"{f}: missing column {need!r} (render needs sample_id and mesh_path)")
        cols = ["sample_id", "mesh_path"] + [c for c in ("status", "message", *COPY_COLUMNS) if c in names]
        t = absolute_media(pq.read_table(f, columns=cols), f.parent)
        for i, row in enumerate(t.to_pylist()):
            if not row["sample_id"]:
                raise InputError(f"{f}: row {i}: empty sample_id")
            row["status"] = row.get("status") or "ok"
            row["message"] = row.get("message") or ""
            row["mesh_path"] = row["mesh_path"] or ""
            if row["sample_id"] in seen:  # two meshes would write the same images/<sample_id>/
                raise InputError(f"{f}: row {i}: duplicate sample_id {row['sample_id']!r}")
            seen.add(row["sample_id"])
            jobs.append(row)
    return jobs


def _render_batch(args) -> list[dict]:
    jobs, out, opts = args
    return [r for job in jobs for r in render_one(job, out, opts)]


def _render_in_process(jobs: list[dict], out: str, opts: RenderOptions, progress, writers: int = 4) -> list[dict]:
    """Render jobs one after another here (torch backend) while threads encode and write the
    PNGs of earlier meshes (Pillow releases the GIL while encoding). Rows keep input order."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    rows: list[dict] = []
    pending: deque = deque()
    with ThreadPoolExecutor(writers) as pool:
        for job in progress.track(jobs, total=len(jobs), desc="render"):
            job_rows, res = render_job(job, opts)
            pending.append(pool.submit(write_job, job, job_rows, res, out, opts))
            while len(pending) > 2 * writers:  # bounds the rendered arrays held in memory
                rows += pending.popleft().result()
        while pending:
            rows += pending.popleft().result()
    return rows


def renders_table(rows: list[dict], opts: RenderOptions, copied: list[str]) -> pa.Table:
    cols = {"sample_id": pa.string(), "view": pa.int32(), "azimuth": pa.float32(), "elevation": pa.float32(),
            "image_path": pa.string(), "status": pa.string(), "message": pa.string()}
    types = {"prompt_id": pa.string(), "level": pa.string(), "sample_index": pa.int32(), "prompt": pa.string()}
    cols.update({c: types[c] for c in copied})
    if opts.depth or opts.normals:
        cols.update(depth_path=pa.string(), normal_path=pa.string())
    if opts.sheet:
        cols["sheet_path"] = pa.string()
    return pa.table({c: pa.array([r.get(c) for r in rows], t) for c, t in cols.items()})


def run_render(samples, opts, views: int = 6, preset: str = "default", elevation: float = DEFAULT_ELEVATION,
               resolution: int = 512, background="white", fov: float = DEFAULT_FOV, depth: bool = False,
               normals: bool = False, sheet: bool = True, framing: str = "object",
               workers: int | None = None, backend: str = "auto", device: str | None = None) -> dict:
    """Render every mesh of `samples` (table or GLB dir) owned by opts.shard into opts.out.

    open3d backend: `workers` processes render meshes in parallel. torch backend: meshes are
    rendered one after another in this process (torch parallelises each cast itself, and one
    CUDA context beats one per worker) while a few threads write the PNGs."""
    from rl3d.stages.contract import run_stage

    if resolution < 8 or resolution > 4096:
        raise InputError(f"--resolution {resolution}: expected 8..4096")
    if not 1.0 <= fov <= 150.0:
        raise InputError(f"--fov {fov}: expected 1..150 degrees")
    parse_color(background)
    if framing not in FRAMINGS:
        raise InputError(f"--framing {framing!r}: expected one of {', '.join(FRAMINGS)}")
    view_angles(views, preset, elevation)  # validate before any work
    backend = resolve_backend(backend)
    device = pick_device(device) if backend == "torch" else None
    ropts = RenderOptions(views, preset, float(elevation), int(resolution), str(background), float(fov),
                          bool(depth), bool(normals), bool(sheet), str(framing), backend, device)
    jobs = read_jobs(samples)
    workers = workers or min(2, os.cpu_count() or 1)
    # the backend changes edge pixels, so it is part of the config; the device is not
    config = {"samples": str(Path(samples).resolve()), **{k: v for k, v in asdict(ropts).items() if k != "device"}}
    copied = [c for c in COPY_COLUMNS if any(c in j for j in jobs)]  # same schema in every shard

    def produce(shard, progress):
        mine = [j for j in jobs if shard.owns(j.get("prompt_id") or j["sample_id"])]
        t0 = time.time()
        rows: list[dict] = []
        if backend == "torch":
            rows = _render_in_process(mine, str(opts.out), ropts, progress)
        elif workers <= 1 or len(mine) <= 1:
            for job in progress.track(mine, total=len(mine), desc="render"):
                rows += render_one(job, str(opts.out), ropts)
        else:
            # a few meshes per task keeps process overhead low; map keeps input order (determinism)
            chunk = max(1, min(8, len(mine) // (workers * 4)))
            batches = [(mine[i:i + chunk], str(opts.out), ropts) for i in range(0, len(mine), chunk)]
            import multiprocessing as mp

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                for part in progress.track(pool.map(_render_batch, batches), total=len(batches), desc="render"):
                    rows += part
        secs = time.time() - t0
        ok = sum(1 for r in rows if r["status"] == "ok")
        failed = sorted({r["sample_id"] for r in rows if r["status"] != "ok"})
        stats = {"meshes": len(mine), "views": len(rows), "ok_views": ok, "failed_meshes": len(failed),
                 "views_per_s": round(ok / secs, 2) if secs > 0 else None}
        return renders_table(rows, ropts, copied), stats

    return run_stage("render", "renders", opts, config, produce)
