"""Shading and colours, shared by both ray engines.

Our meshes are flat-coloured (one palette colour per face), so a face's shade in a view depends
only on (view, face): we build a small per-view look-up table of shaded face colours and gather
it by the hit primitive id, which is much cheaper than shading every pixel. Lighting, in the
camera frame so every view is lit alike: ambient + Lambert headlight + a key light from the
upper left; faces are two-sided.
"""
from __future__ import annotations

import numpy as np
from PIL import ImageColor

from rl3d.formats.errors import InputError

AMBIENT, HEADLIGHT, KEY = 0.35, 0.50, 0.30
KEY_DIR_CAM = np.array([-0.45, 0.75, 0.5], np.float32)  # towards the key light: upper left, in front


def parse_color(text) -> tuple[int, int, int]:
    """A colour name or hex (#fff, #ffffff) or an (r, g, b) tuple -> (r, g, b)."""
    if isinstance(text, (tuple, list)):
        return tuple(int(c) for c in text[:3])
    try:
        return ImageColor.getrgb(str(text))[:3]
    except ValueError:
        raise InputError(f"--background {text!r}: not a colour name or hex (#rrggbb)") from None


def face_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    ln = np.linalg.norm(n, axis=1, keepdims=True)
    return np.divide(n, ln, out=np.zeros_like(n), where=ln > 0)


def camera_normals(verts: np.ndarray, faces: np.ndarray, right, up, fwd) -> np.ndarray:
    """Camera-space face normals per view, float32[V, F, 3] (x right, y up, z towards the
    camera), turned towards the camera (two-sided faces)."""
    fn = face_normals(verts, faces)
    cam = np.stack([fn @ right.T, fn @ up.T, -(fn @ fwd.T)], -1).transpose(1, 0, 2)  # [V, F, 3]
    cam *= np.where(cam[..., 2:3] < 0, -1.0, 1.0).astype(np.float32)
    return cam


def face_shades(cam_normals: np.ndarray) -> np.ndarray:
    """Brightness of every face in every view, [V, F]: ambient + headlight + key light."""
    key = KEY_DIR_CAM / np.linalg.norm(KEY_DIR_CAM)
    return AMBIENT + HEADLIGHT * cam_normals[..., 2] + KEY * np.maximum(cam_normals @ key, 0)


def colour_table(colours: np.ndarray, shades: np.ndarray, background) -> np.ndarray:
    """Shaded face colours per view as RGBA uint8[V, F + 1, 4] (viewable as one packed uint32 per
    entry: one 4-byte gather per pixel); the last entry of each view is the background."""
    nviews, nf = shades.shape
    lut = np.empty((nviews, nf + 1, 4), np.uint8)
    lut[:, :nf, :3] = np.clip(colours[None].astype(np.float32) * shades[..., None], 0, 255).round()
    lut[:, nf, :3] = parse_color(background)
    lut[..., 3] = 255
    return lut


def table_index(primitive_id: np.ndarray, mask: np.ndarray, nfaces: int) -> np.ndarray:
    """Flat look-up index per pixel, uint32[V, H, W]: view * (F + 1) + primitive id, F where
    the ray missed (the background entry)."""
    idx = np.where(mask, primitive_id, np.uint32(nfaces))
    idx += (np.arange(len(idx), dtype=np.uint32) * np.uint32(nfaces + 1))[:, None, None]
    return idx


def pixel_colours(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """rgb uint8[V, H, W, 3] gathered from a colour_table."""
    rgba = table.view(np.uint32).reshape(-1).take(idx)
    return np.ascontiguousarray(rgba.view(np.uint8).reshape(*idx.shape, 4)[..., :3])


def pixel_normals(cam_normals: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Camera-space normals float32[V, H, W, 3] per pixel, 0 on the background."""
    nviews = len(cam_normals)
    table = np.concatenate([cam_normals.astype(np.float32), np.zeros((nviews, 1, 3), np.float32)], 1)
    return table.reshape(-1, 3)[idx]
