"""Cameras: view angles, camera frames, one pinhole ray per pixel, and framing.

World frame = glTF's (formats/voxels.py): right-handed, +Y up, +Z front. Cameras have +Y up.
Azimuth 0 looks at the object's front (camera on +Z), azimuth 90 looks from +X (the object's
left); elevation > 0 looks down from above. Framing "object" (default) looks at the centre of the
mesh's bounding box from where the box fills ~80% of the frame; framing "cube" looks at the
origin from the smallest distance at which the unit cube [-0.5, 0.5]^3 (the voxel grid) fits
every view, so sizes compare across meshes. Both framings use the same rays: "object" moves and
scales the mesh instead of the cameras (object_scale).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from rl3d.formats.errors import InputError

DEFAULT_ELEVATION = 20.0
DEFAULT_FOV = 40.0
FIT_MARGIN = 1.04  # framing "cube": the unit cube's silhouette fills at most 1/1.04 of the frame
OBJECT_FILL = 0.8  # framing "object": the mesh's bounding box fills at most 80% of the frame
FRAMINGS = ("object", "cube")
PRESETS = ("default", "orbit")


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
        if not -90.0 < float(elevation) < 90.0:  # nan, inf or a pole: blank images with status ok
            raise InputError(f"--elevation {elevation}: expected a number of degrees strictly between -90 and 90")
        az = (30.0 + np.arange(views) * 360.0 / views) % 360.0
        el = np.full(views, float(elevation))
    else:
        raise InputError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    return az.astype(np.float32), el.astype(np.float32)


def check_framing(framing: str) -> None:
    if framing not in FRAMINGS:
        raise InputError(f"--framing {framing!r}: expected one of {', '.join(FRAMINGS)}")


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
    distance an engine returns is the z-depth."""
    half = math.tan(math.radians(fov) / 2)
    s = ((np.arange(resolution, dtype=np.float32) + 0.5) / resolution * 2 - 1) * half
    n = len(eye)
    rays = np.empty((n, resolution, resolution, 6), np.float32)
    rays[..., :3] = eye[:, None, None, :]
    # direction = fwd + u * right + v * up, with image x to the right and image y down
    horiz = fwd[:, None, :] + s[None, :, None] * right[:, None, :]  # [V, W, 3]
    np.add(horiz[:, None, :, :], -s[None, :, None, None] * up[:, None, None, :], out=rays[..., 3:])
    return rays


@functools.lru_cache(maxsize=8)
def cached_frames(az: tuple, el: tuple, fov: float):
    """Camera frames (eye, right, up, forward) of the unit-cube framing, shared by every mesh of a
    render run (no rays: processes that only prepare meshes need not build them)."""
    return camera_frames(az, el, fit_distance(fov, az, el))


@functools.lru_cache(maxsize=4)
def cached_cameras(az: tuple, el: tuple, resolution: int, fov: float):
    """Camera frames of the unit-cube framing and their rays (read-only numpy); every mesh of a
    render run shares the same cameras."""
    frames = cached_frames(az, el, fov)
    rays = camera_rays(*frames, resolution, fov)
    rays.setflags(write=False)
    return frames, rays


def object_scale(verts: np.ndarray, fov: float, az, el) -> tuple[np.ndarray, float]:
    """Centre and scale that make the mesh's bounding box fill OBJECT_FILL of the frame when
    seen by the unit-cube cameras (scaling the object = moving the camera closer)."""
    lo, hi = verts.min(0), verts.max(0)
    half = np.maximum((hi - lo) / 2, 1e-6)
    cube = fit_distance(fov, az, el)
    return (lo + hi) / 2, cube / fit_distance(fov, az, el, 1 / OBJECT_FILL, half)
