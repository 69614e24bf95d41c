"""Charts for the eval report and the learning summary: grouped bars, step curves and a grid of
renders, as PNG files. Drawn with PIL (no plotting dependency)."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from rl3d.formats.shards import atomic_path
from rl3d.stages.scoring.registry import format_value

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def font(size: int):
    return ImageFont.load_default(size=size)


def _text_w(draw, text, font) -> float:
    return draw.textlength(text, font=font)


def bar_chart(title: str, groups: list[str], series: dict[str, list[float | None]], path: Path,
              ylabel: str = "", width: int = 900, height: int = 420) -> Path:
    """Grouped bars: one group per x label, one coloured bar per series (policy), value labels
    on the bars, a legend, y grid lines from 0 (or the data minimum when negative)."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    f_title, f, f_small = font(18), font(13), font(11)
    left, right, top, bottom = 70, 20, 60, 90
    vals = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    lo = min(0.0, min(vals)) if vals else 0.0
    hi = max(vals) if vals else 1.0
    hi = hi if hi > lo else lo + 1.0
    step = _nice_step((hi - lo) / 5)
    lo, hi = math.floor(lo / step) * step, math.ceil(hi / step) * step
    ph, pw = height - top - bottom, width - left - right

    def y_of(v):
        return top + ph * (1 - (v - lo) / (hi - lo))

    d.text((left, 12), title, fill="black", font=f_title)
    for k in range(int(round((hi - lo) / step)) + 1):
        v = lo + k * step
        y = y_of(v)
        d.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        lab = f"{v:g}"
        d.text((left - 8 - _text_w(d, lab, f_small), y - 7), lab, fill=(80, 80, 80), font=f_small)
    d.line([(left, top), (left, top + ph)], fill="black")
    d.line([(left, y_of(0)), (width - right, y_of(0))], fill="black")
    if ylabel:
        d.text((8, top - 22), ylabel, fill=(80, 80, 80), font=f_small)
    names = list(series)
    gw = pw / max(1, len(groups))
    bw = min(40.0, gw * 0.8 / max(1, len(names)))
    for gi, g in enumerate(groups):
        x0 = left + gi * gw + (gw - bw * len(names)) / 2
        for si, n in enumerate(names):
            v = series[n][gi]
            x = x0 + si * bw
            if v is None or not math.isfinite(v):
                d.text((x + bw / 2 - 3, y_of(0) - 14), "-", fill=(150, 150, 150), font=f_small)
                continue
            y, y0 = y_of(v), y_of(0)
            d.rectangle([x + 1, min(y, y0), x + bw - 1, max(y, y0)], fill=PALETTE[si % len(PALETTE)])
            lab = format_value(v)
            if bw >= 22:
                d.text((x + bw / 2 - _text_w(d, lab, f_small) / 2, min(y, y0) - 13), lab, fill="black", font=f_small)
        lab = g if _text_w(d, g, f) <= gw - 4 else g[: max(3, int(len(g) * (gw - 4) / _text_w(d, g, f)) - 1)] + "…"
        d.text((left + gi * gw + gw / 2 - _text_w(d, lab, f) / 2, top + ph + 8), lab, fill="black", font=f)
    lx = left
    for si, n in enumerate(names):
        d.rectangle([lx, height - 30, lx + 14, height - 16], fill=PALETTE[si % len(PALETTE)])
        d.text((lx + 20, height - 31), n, fill="black", font=f)
        lx += 40 + _text_w(d, n, f)
    return _save(img, path)


def _nice_step(raw: float) -> float:
    if raw <= 0 or not math.isfinite(raw):
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def line_chart(title: str, curves: dict[str, tuple[list[float], list[float]]], path: Path,
               width: int = 900, height: int = 360) -> Path:
    """Lines of (step, value) per name on shared axes (one chart per metric name is typical)."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    f_title, f, f_small = font(18), font(13), font(11)
    left, right, top, bottom = 70, 20, 50, 70
    xs = [x for xv, _ in curves.values() for x in xv]
    ys = [y for _, yv in curves.values() for y in yv if math.isfinite(y)]
    x0, x1 = (min(xs), max(xs)) if xs else (0, 1)
    y0, y1 = (min(ys), max(ys)) if ys else (0, 1)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def pt(x, y):
        return left + pw * (x - x0) / (x1 - x0), top + ph * (1 - (y - y0) / (y1 - y0))

    d.text((left, 12), title, fill="black", font=f_title)
    for k in range(6):
        v = y0 + (y1 - y0) * k / 5
        _, y = pt(x0, v)
        d.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        lab = f"{v:.3g}"
        d.text((left - 8 - _text_w(d, lab, f_small), y - 7), lab, fill=(80, 80, 80), font=f_small)
    xstep = _nice_step((x1 - x0) / 5)
    if all(float(x).is_integer() for x in xs):
        xstep = max(1.0, round(xstep))
    v = math.ceil(x0 / xstep) * xstep
    while v <= x1 + 1e-9:
        x, _ = pt(v, y0)
        lab = f"{v:g}"
        d.text((x - _text_w(d, lab, f_small) / 2, top + ph + 6), lab, fill=(80, 80, 80), font=f_small)
        v += xstep
    d.text((left + pw / 2 - 15, top + ph + 22), "step", fill=(80, 80, 80), font=f_small)
    d.rectangle([left, top, left + pw, top + ph], outline="black")
    lx = left
    for i, (name, (xv, yv)) in enumerate(curves.items()):
        col = PALETTE[i % len(PALETTE)]
        pts = [pt(x, y) for x, y in zip(xv, yv) if math.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        for p in pts:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=col)
        d.rectangle([lx, height - 24, lx + 14, height - 10], fill=col)
        d.text((lx + 20, height - 25), name, fill="black", font=f)
        lx += 40 + _text_w(d, name, f)
    return _save(img, path)


def render_grid(grid: list[dict], policies: list[str], path: Path, views: int = 3, tile: int = 128) -> Path | None:
    """Rows = prompts, columns = reference (when any) + policies; each cell `views` views side by side."""
    if not grid:
        return None
    cols = (["reference"] if any(g.get("reference") for g in grid) else []) + policies
    label_h, head_h, cell_w = 34, 28, views * tile + 12
    img = Image.new("RGB", (cell_w * len(cols) + 10, head_h + len(grid) * (tile + label_h) + 10), "white")
    d = ImageDraw.Draw(img)
    f, f_small = font(14), font(12)
    for ci, c in enumerate(cols):
        d.text((10 + ci * cell_w, 6), c, fill="black", font=f)
    for ri, g in enumerate(grid):
        y = head_h + ri * (tile + label_h)
        text = f"[{g['category']}] {g['prompt']}"
        while _text_w(d, text, f_small) > img.width - 20 and len(text) > 10:
            text = text[:-2]
        d.text((10, y + 4), text if text.endswith(g["prompt"][-1:]) else text + "…", fill=(60, 60, 60), font=f_small)
        for ci, c in enumerate(cols):
            paths = g.get("reference", []) if c == "reference" else g["policies"].get(c, [])
            x = 10 + ci * cell_w
            if not paths:
                d.rectangle([x, y + label_h - 12, x + views * tile - 2, y + label_h - 12 + tile - 2], outline=(200, 200, 200))
                why = "no reference render" if c == "reference" else "no render (failed sample)"
                d.text((x + 8, y + label_h + tile / 2 - 20), why, fill=(170, 60, 60), font=f_small)
                continue
            for vi, p in enumerate(_spread(paths, views)):
                with Image.open(p) as im:
                    im = im.convert("RGB")
                    im = im.resize((tile, max(1, round(tile * im.height / im.width))), Image.LANCZOS)
                    img.paste(im, (x + vi * tile, y + label_h - 12))
    return _save(img, path)


def _spread(paths: list[str], k: int) -> list[str]:
    """k views spread evenly around the orbit."""
    if len(paths) <= k:
        return paths
    return [paths[int(i * len(paths) / k)] for i in range(k)]


def _save(img: Image.Image, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)
    return path
