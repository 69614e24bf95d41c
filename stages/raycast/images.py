"""Rendered arrays as image files: views, 16-bit depth, normal maps and a captioned contact sheet."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rl3d.formats.shards import atomic_path
from rl3d.stages.raycast.shading import parse_color


# zlib level 1: about half of level 6's encoding time for files ~1.8x larger (a 512 px view: ~9 KB instead
# of ~5 KB); PNG is lossless at every level, so the pixels read back are the same
PNG_LEVEL = 1


def save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=PNG_LEVEL)


def depth_millimetres(depth: np.ndarray) -> np.ndarray:
    """z-depth in mesh units (metres) -> uint16 millimetres, 0 = background."""
    return np.clip(np.round(depth * 1000), 0, 65535).astype(np.uint16)


def normal_colours(normal: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Camera-space normals -> uint8 (n + 1) / 2 * 255, background 0."""
    nrm = np.where(mask[..., None], np.round((normal + 1) * 127.5), 0)
    return np.clip(nrm, 0, 255).astype(np.uint8)


def contact_sheet(rgb: np.ndarray, caption: str, labels: list[str], background, tile: int = 256) -> np.ndarray:
    """Views on a grid (3x2 for 6 views) under a caption bar, uint8[H, W, 3]."""
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
        # reducing_gap: box-reduce by the whole factor first (512 -> 256 px: a tenth of Lanczos' time)
        sheet.paste(Image.fromarray(img).resize((tile, tile), Image.Resampling.LANCZOS, reducing_gap=1.0), (x, y))
        draw.text((x + 4, y + tile - 16), labels[i], fill=(110, 110, 110), font=small)
    draw.rectangle([0, 0, sheet.width, bar - 1], fill=(40, 40, 40))
    font = ImageFont.load_default(size=15)
    text = caption
    while len(text) > 4 and draw.textlength(text, font=font) > sheet.width - 16:
        text = text[:-4] + "..."
    draw.text((8, 7), text, fill=(255, 255, 255), font=font)
    return np.asarray(sheet)
