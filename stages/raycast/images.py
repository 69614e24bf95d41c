"""Rendered arrays as image files: views, 16-bit depth, normal maps and a captioned contact sheet."""
from __future__ import annotations

import math
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rl3d.formats.shards import atomic_path
from rl3d.stages.raycast.shading import parse_color


# zlib level 1: about half of level 6's encoding time for files ~1.8x larger (a 512 px view: ~9 KB instead
# of ~5 KB); PNG is lossless at every level, so the pixels read back are the same
PNG_LEVEL = 1


def save_png(array: np.ndarray, path: Path) -> None:
    """uint8 RGB [H, W, 3] and grey [H, W] arrays through png_bytes; anything else (16-bit depth)
    through Pillow."""
    with atomic_path(path) as tmp:
        if array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
            Path(tmp).write_bytes(png_bytes(array))
        else:
            Image.fromarray(array).save(tmp, format="PNG", compress_level=PNG_LEVEL)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def png_bytes(array: np.ndarray) -> bytes:
    """A PNG file of a uint8 RGB [H, W, 3] or grey [H, W] array: every row stored with PNG's Up
    filter (its difference to the row above, one numpy subtraction for the whole image), then
    zlib at PNG_LEVEL. Pillow picks a filter for each row by trying several in a byte loop, which
    was ~60% of its time on a 512 px view: this takes ~3.0x less time (1.4 against 4.6 ms) for files
    of the same size, and zlib and numpy let go of the GIL while they work."""
    a = np.ascontiguousarray(array)
    h, w = a.shape[:2]
    rows = a.reshape(h, -1)
    filtered = np.empty((h, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 2                     # Up; the first row's "row above" is zeros: its bytes as they are
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 wraps mod 256, as PNG's filter does
    colour = 2 if a.ndim == 3 else 0       # truecolour or greyscale, 8 bits a sample
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(filtered, PNG_LEVEL)) + _chunk(b"IEND", b""))


def depth_millimetres(depth: np.ndarray) -> np.ndarray:
    """z-depth in mesh units (metres) -> uint16 millimetres, 0 = background."""
    return np.clip(np.round(depth * 1000), 0, 65535).astype(np.uint16)


def normal_colours(normal: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Camera-space normals -> uint8 (n + 1) / 2 * 255, background 0."""
    nrm = np.where(mask[..., None], np.round((normal + 1) * 127.5), 0)
    return np.clip(nrm, 0, 255).astype(np.uint8)


_FONTS = threading.local()


def _font(size: int):
    """The caption font, parsed once a thread, not once a sheet (a FreeType face is not to be used
    by two threads at once, and render's writers are threads)."""
    fonts = _FONTS.__dict__.setdefault("by_size", {})
    if size not in fonts:
        fonts[size] = ImageFont.load_default(size=size)
    return fonts[size]


def contact_sheet(rgb: np.ndarray, caption: str, labels: list[str], background, tile: int = 256) -> np.ndarray:
    """Views on a grid (3x2 for 6 views) under a caption bar, uint8[H, W, 3]."""
    n = len(rgb)
    rows = max(1, math.ceil(math.sqrt(n / 1.5)))
    cols = math.ceil(n / rows)
    bar, pad = 30, 4
    bg = parse_color(background)
    sheet = Image.new("RGB", (cols * tile + (cols + 1) * pad, bar + rows * tile + (rows + 1) * pad), bg)
    draw = ImageDraw.Draw(sheet)
    small = _font(12)
    for i, img in enumerate(rgb):
        x, y = pad + (i % cols) * (tile + pad), bar + pad + (i // cols) * (tile + pad)
        # reducing_gap: box-reduce by the whole factor first (512 -> 256 px: a tenth of Lanczos' time)
        sheet.paste(Image.fromarray(img).resize((tile, tile), Image.Resampling.LANCZOS, reducing_gap=1.0), (x, y))
        draw.text((x + 4, y + tile - 16), labels[i], fill=(110, 110, 110), font=small)
    draw.rectangle([0, 0, sheet.width, bar - 1], fill=(40, 40, 40))
    font = _font(15)
    text = caption
    while len(text) > 4 and draw.textlength(text, font=font) > sheet.width - 16:
        text = text[:-4] + "..."
    draw.text((8, 7), text, fill=(255, 255, 255), font=font)
    return np.asarray(sheet)
