"""render_views: every view of one mesh with one batched ray cast (cameras -> engine -> shading).

A mesh is first prepared on the CPU (prepare_mesh: framing, faces, per-view colour and normal
tables; numpy, small, picklable), then cast and shaded by a backend: open3d (Embree, CPU) here in
numpy, or torch (torch_renderer: many meshes at once on a torch device, the same numbers).

torch is imported only where the torch backend is chosen, on purpose: importing torch costs
~1.5 s of CPU per process, which every spawned open3d worker would otherwise pay.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from rl3d.formats.errors import InputError
from rl3d.formats.glb import face_rgb
from rl3d.stages.raycast import open3d_engine, shading
from rl3d.stages.raycast.cameras import DEFAULT_FOV, cached_cameras, cached_frames, check_framing, object_scale
from rl3d.stages.raycast.engines import INVALID_ID, Hits, resolve_backend

MAX_SUPERSAMPLE = 8


def mesh_arrays(mesh) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertices float32[N,3], faces uint32[F,3], face colours uint8[F,3] of a trimesh mesh."""
    v = np.asarray(mesh.vertices, np.float32)
    f = np.asarray(mesh.faces, np.int64)
    if len(f) == 0:
        raise ValueError("mesh holds no triangles")
    return v, f.astype(np.uint32), face_rgb(mesh)


@dataclass(frozen=True)
class PreparedMesh:
    """One mesh ready to cast and shade in the views it was prepared for (numpy; made on the CPU,
    picklable, so reader processes can make them while a device casts)."""
    verts: np.ndarray            # float32[N, 3], moved and scaled by the framing
    faces: np.ndarray            # uint32[F, 3]
    table: np.ndarray            # shaded face colours RGBA uint8[V, F + 1, 4]; the last entry is the background
    normals: np.ndarray | None   # camera-space face normals float32[V, F, 3] (with_normals only)
    scale: float                 # framed units per mesh unit (depth is divided back); 1.0 for framing "cube"
    solid: int = 0               # the surface of a solid wound outward (1) or inward (-1), else 0 (solid_winding)


def prepare_mesh(mesh, azimuths, elevations, fov: float = DEFAULT_FOV, background="white", *,
                 framing: str = "object", with_normals: bool = True, skip_back_faces: bool = True) -> PreparedMesh:
    """A trimesh mesh -> PreparedMesh: framing (framing "object" moves and scales the mesh so that
    every mesh shares the same cameras), face normals in each camera, shaded colour tables, and
    whether it bounds a solid (the torch caster then skips faces turned away; skip_back_faces
    False: never)."""
    check_framing(framing)
    verts, faces, colours = mesh_arrays(mesh)
    az, el = angle_tuples(azimuths, elevations)
    _, right, up, fwd = cached_frames(az, el, float(fov))
    scale = 1.0
    if framing == "object":  # the same rays for every mesh: move and scale the mesh instead
        centre, scale = object_scale(verts, fov, az, el)
        verts = ((verts - centre) * scale).astype(np.float32)
    cam = shading.camera_normals(verts, faces, right, up, fwd)
    table = shading.colour_table(colours, shading.face_shades(cam), background)
    return PreparedMesh(verts, faces, table, cam if with_normals else None, float(scale),
                        solid_winding(verts, faces) if skip_back_faces else 0)


def _by_position(verts) -> np.ndarray:
    """Per vertex the index of the first vertex at the same position (float32 bits; a -0.0 beside a
    0.0 stays apart, which only makes a solid look open)."""
    bits = np.ascontiguousarray(np.asarray(verts, np.float32)).view(np.uint32).reshape(-1, 3)
    order = np.lexsort((bits[:, 2], bits[:, 1], bits[:, 0]))
    ranked = bits[order]
    new = np.ones(len(ranked), bool)
    new[1:] = (ranked[1:] != ranked[:-1]).any(1)
    ids = np.empty(len(ranked), np.int64)
    ids[order] = np.cumsum(new) - 1
    return ids


def solid_winding(verts, faces) -> int:
    """1 where the triangles bound a solid wound outward (counter-clockwise seen from outside, as
    glTF's front faces), -1 where wound inward, 0 where they bound none: some edge is crossed more
    often in one direction than in the other (an open or inconsistently wound surface), or the
    enclosed volume is ~0. Voxel meshes bound solids though voxels meeting at an edge make them
    non-manifold. A ray from outside a solid enters it first through a face turned towards it, so
    the caster may skip the faces turned away (torch_engine.cast_meshes)."""
    f = np.asarray(faces, np.int64)
    if len(f) == 0:
        return 0
    f = _by_position(verts)[f]  # meshes written with a vertex per face corner (flat colours) share none
    a, b = f.reshape(-1), np.roll(f, -1, axis=1).reshape(-1)
    n = int(f.max()) + 1
    if not np.array_equal(np.sort(a * n + b), np.sort(b * n + a)):  # each edge as often both ways
        return 0
    v = np.asarray(verts, np.float64)[np.asarray(faces, np.int64)]
    volume = np.einsum("ij,ij->i", v[:, 0], np.cross(v[:, 1], v[:, 2])).sum() / 6.0
    extent = float(np.ptp(v.reshape(-1, 3), axis=0).max())
    if not abs(volume) > 1e-9 * max(extent, 1e-12) ** 3:
        return 0
    return 1 if volume > 0 else -1


def angle_tuples(azimuths, elevations) -> tuple[tuple, tuple]:
    """View angles as tuples of floats (the cameras' cache keys)."""
    return (tuple(float(a) for a in np.atleast_1d(azimuths)), tuple(float(e) for e in np.atleast_1d(elevations)))


def _torch_engine():
    """The torch engine module, imported on first use (see the module docstring)."""
    from rl3d.stages.raycast import torch_engine

    return torch_engine


def _torch_renderer():
    """The torch renderer module, imported on first use (see the module docstring)."""
    from rl3d.stages.raycast import torch_renderer

    return torch_renderer


def resolve_engine(backend: str = "auto", device: str | None = None) -> tuple[str, str | None]:
    """(backend, device) resolved: "open3d" with no device, or "torch" on a checked torch device."""
    backend = resolve_backend(backend)
    if backend == "open3d":
        return backend, None
    return backend, _torch_engine().pick_device(device)


@functools.lru_cache(maxsize=4)
def _prepared_rays(az: tuple, el: tuple, resolution: int, fov: float, backend: str, device: str | None):
    """The shared cameras' rays in the form the engine wants, built once per camera set."""
    rays = cached_cameras(az, el, resolution, fov)[1]
    if backend == "open3d":
        return open3d_engine.prepare_rays(rays)
    return _torch_engine().prepare_rays(rays, device)


def cast_camera_rays(verts, faces, az: tuple, el: tuple, resolution: int, fov: float, backend: str,
                     device: str | None = None) -> Hits:
    """The hits of the shared cameras' rays (framing "cube") with one engine's generic caster:
    open3d, or torch's cone-culled one (the torch renderer casts many meshes at once instead)."""
    backend, device = resolve_engine(backend, device)
    rays = _prepared_rays(az, el, resolution, fov, backend, device)
    if backend == "open3d":
        return open3d_engine.cast_rays(verts, faces, rays)
    return _torch_engine().cast_rays(verts, faces, rays)


def check_supersample(supersample: int) -> int:
    if not 1 <= int(supersample) <= MAX_SUPERSAMPLE:
        raise InputError(f"--supersample {supersample}: expected 1..{MAX_SUPERSAMPLE}")
    return int(supersample)


def block_sum(a: np.ndarray, k: int, dtype) -> np.ndarray:
    """Sums of the k x k pixel blocks of [V, H*k, W*k, ...] -> [V, H, W, ...] (k^2 strided adds:
    faster than a reshape's copy)."""
    out = np.zeros((a.shape[0], a.shape[1] // k, a.shape[2] // k, *a.shape[3:]), dtype)
    for dy in range(k):
        for dx in range(k):
            out += a[:, dy::k, dx::k]
    return out


def downsample(views: dict, k: int) -> dict:
    """Views rendered k times larger -> views at the final size, each pixel resolving its k x k
    sub-pixel samples: rgb is their mean (box filter, rounded half up), mask is "at least half of
    them hit", depth the mean depth and normal the normalised mean normal of those that hit
    (0 where the mask is off)."""
    n = k * k
    rgb = ((block_sum(views["rgb"], k, np.uint16) + n // 2) // n).astype(np.uint8)
    hits = block_sum(views["mask"], k, np.uint16)
    mask = 2 * hits >= n
    per_hit = np.float32(1) / np.maximum(hits, 1).astype(np.float32)
    depth = np.where(mask, block_sum(views["depth"], k, np.float32) * per_hit, np.float32(0))  # misses hold 0
    normal = None
    if views["normal"] is not None:
        total = block_sum(views["normal"], k, np.float32)  # misses hold 0
        length = np.linalg.norm(total, axis=-1, keepdims=True)
        normal = np.where(mask[..., None], total / np.maximum(length, np.float32(1e-12)), np.float32(0))
    return {"rgb": rgb, "depth": depth, "normal": normal, "mask": mask}


def shade_hits(prepared: PreparedMesh, hits: Hits, k: int = 1) -> dict:
    """A prepared mesh's hits -> views (numpy): depth back in mesh units, colours and normals
    gathered by the hit triangle id, then resolved to the final size when supersampled (k > 1)."""
    depth, pid = hits
    mask = pid != INVALID_ID
    depth = np.array(depth, np.float32)
    depth[~mask] = 0
    if prepared.scale != 1.0:
        depth /= np.float32(prepared.scale)  # back to mesh units
    idx = shading.table_index(pid, mask, len(prepared.faces))
    rgb = shading.pixel_colours(prepared.table, idx)
    normal = shading.pixel_normals(prepared.normals, idx) if prepared.normals is not None else None
    views = {"rgb": rgb, "depth": depth, "normal": normal, "mask": mask}
    return downsample(views, k) if k > 1 else views


def render_views(mesh, azimuths, elevations, resolution: int = 512, fov: float = DEFAULT_FOV,
                 background="white", *, framing: str = "object", with_normals: bool = True,
                 backend: str = "auto", device: str | None = None, supersample: int = 1,
                 skip_back_faces: bool = True) -> dict:
    """Render all views of one mesh with one batched ray cast.

    framing "object": cameras look at the centre of the mesh's bounding box from the distance
    at which the box fills ~80% of the frame (sizes are normalised, as in most 3D evals);
    "cube": cameras look at the origin from the distance at which the unit cube fits, so
    sizes compare across meshes. +Y is up in both.
    backend "open3d" (Embree, CPU), "torch" (on `device`, default cuda when available) or
    "auto" (torch on CUDA, else open3d when installed, else torch); only the ray hits differ,
    shading is shared. Many meshes at once on a device: torch_renderer.render_batch.
    supersample k > 1 anti-aliases: k x k rays per pixel (the image rendered k times larger),
    resolved by `downsample`; 1 (the default here) casts one ray through each pixel's centre.
    skip_back_faces (torch): a solid's faces turned away from a camera are not cast against
    (about 2x faster; solid_winding; the same images but for a few pixels in a million where a ray
    slips between two faces of a closed surface).
    Returns rgb uint8[V,H,W,3], depth float32[V,H,W] (z-depth in mesh units, 0 where empty),
    normal float32[V,H,W,3] (camera space, 0 where empty; None unless with_normals) and mask
    bool[V,H,W].
    """
    check_framing(framing)
    k = check_supersample(supersample)
    backend, device = resolve_engine(backend, device)
    az, el = angle_tuples(azimuths, elevations)
    prepared = prepare_mesh(mesh, az, el, fov, background, framing=framing, with_normals=with_normals,
                            skip_back_faces=skip_back_faces)
    if backend == "torch":
        return _torch_renderer().render_batch([prepared], az, el, int(resolution), float(fov), device, k)[0]
    hits = cast_camera_rays(prepared.verts, prepared.faces, az, el, int(resolution) * k, float(fov), backend, device)
    return shade_hits(prepared, hits, k)

