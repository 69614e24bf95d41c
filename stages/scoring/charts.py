"""Charts for the eval report and the learning summary, as PNG files: grouped bars and step
curves through matplotlib (its object API on the Agg canvas: no display, no global pyplot state),
and the grid of renders (a montage of images, PIL)."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from rl3d.formats.shards import atomic_path
from rl3d.stages.scoring.registry import format_value

# matplotlib's tab10, one colour per policy / run
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
DPI = 100


def font(size: int):
    return ImageFont.load_default(size=size)


def _text_w(draw, text, f) -> float:
    return draw.textlength(text, font=f)


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def _tick_label(text: str, width: int = 14) -> str:
    """snake_case category names wrapped onto lines instead of cut off."""
    return "\n".join(textwrap.wrap(text.replace("_", " "), width)) or text


def _figure(width: int, height: int) -> Figure:
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    fig.set_facecolor("white")
    return fig


def _save_figure(fig: Figure, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path


def bar_chart(title: str, groups: list[str], series: dict[str, list[float | None]], path: Path,
              ylabel: str = "", width: int = 900, height: int = 420) -> Path:
    """Grouped bars: one group per x label, one coloured bar per series (policy), the value on
    each bar ("n/a" where there is none), a legend of the series."""
    fig = _figure(width, height)
    ax = fig.add_subplot()
    names = list(series)
    x = np.arange(len(groups))
    w = 0.8 / max(1, len(names))
    labels = {name: [format_value(v) if _finite(v) else "n/a" for v in series[name]] for name in names}
    size = 8 if len(names) * len(groups) > 16 else 9
    # a value label wider than its bar would run into its neighbour's ("80.4580.45"): turn the labels
    # upright then. Bar width in pixels: the axes take about 75% of the figure (legend on the right).
    bar_px = 0.75 * width * w * 0.95 / max(1, len(groups))
    label_px = 0.62 * size * DPI / 72 * max((len(t) for ts in labels.values() for t in ts), default=0)
    upright = label_px > bar_px
    for i, name in enumerate(names):
        vals = series[name]
        heights = [v if _finite(v) else 0.0 for v in vals]
        bars = ax.bar(x + (i - (len(names) - 1) / 2) * w, heights, w * 0.95, label=name,
                      color=PALETTE[i % len(PALETTE)])
        ax.bar_label(bars, labels=labels[name], padding=2, fontsize=size, rotation=90 if upright else 0)
    ax.set_xticks(x, [_tick_label(g) for g in groups], fontsize=9)
    if len(groups) > 1 and groups[-1] == "ALL":  # the overall group stands apart from the categories
        ax.axvline(len(groups) - 1.5, color="#999999", linewidth=0.8, linestyle="--")
    ax.set_title(title, loc="left", fontsize=12)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.margins(y=0.3 if upright else 0.15)  # room for the value labels above the tallest bar
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if names:
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save_figure(fig, path)


def draw_lines(ax: Axes, title: str, curves: dict[str, tuple[list[float], list[float]]]) -> None:
    """Lines of (step, value) per name on one axes, steps on an integer axis when they are integers."""
    xs = [x for xv, _ in curves.values() for x in xv]
    for i, (name, (xv, yv)) in enumerate(curves.items()):
        pts = [(x, y) for x, y in zip(xv, yv) if _finite(y)]
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, linewidth=1.6,
                color=PALETTE[i % len(PALETTE)], label=name)
    step_axes(ax, xs, title, "step")
    if any(_finite(y) for _, yv in curves.values() for y in yv):
        ax.legend(frameon=False, fontsize=8)
    else:  # an empty frame would read as a chart that failed to draw
        ax.text(0.5, 0.5, "not recorded in these runs", transform=ax.transAxes, ha="center", va="center",
                color="0.45", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])


def step_axes(ax: Axes, xs: list[float], title: str, xlabel: str, label_size: int | None = None,
              tick_steps: list[int] | None = None) -> None:
    """An axes of training steps: an integer axis when the steps are integers (ticks at multiples of
    `tick_steps` when given), the title left, a light grid, no top or right spine."""
    if xs and all(float(x).is_integer() for x in xs):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, **({"steps": tick_steps} if tick_steps else {})))
        if max(xs) - min(xs) < 1:  # one step only: widen, or the axis shows fractions of a step
            ax.set_xlim(min(xs) - 1, max(xs) + 1)
    # each tick its own value: matplotlib's shared scale ("1e-5") sits where the title is
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.6g}"))
    ax.set_title(title, loc="left", fontsize=11)
    ax.set_xlabel(xlabel, **({"fontsize": label_size} if label_size else {}))
    ax.grid(alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def line_chart(title: str, curves: dict[str, tuple[list[float], list[float]]], path: Path,
               width: int = 900, height: int = 360) -> Path:
    """Lines of (step, value) per name on shared axes (one chart per metric name is typical)."""
    fig = _figure(width, height)
    draw_lines(fig.add_subplot(), title, curves)
    return _save_figure(fig, path)


def line_sheet(panels: list[tuple[str, dict]], path: Path, columns: int = 2, width: int = 900,
               height: int = 360) -> Path:
    """Several line charts (title, curves) on one image, `columns` per row, each width x height."""
    rows = math.ceil(len(panels) / columns)
    fig = _figure(width * columns, height * rows)
    for i, (title, curves) in enumerate(panels):
        draw_lines(fig.add_subplot(rows, columns, i + 1), title, curves)
    return _save_figure(fig, path)


def render_grid(grid: list[dict], policies: list[str], path: Path, views: int = 3, tile: int = 128) -> Path | None:
    """Rows = prompts, columns = reference (when any) + policies; each cell `views` views side by side."""
    if not grid:
        return None
    cols = (["reference"] if any(g.get("reference") for g in grid) else []) + policies
    # no empty slots: as many view columns as the most views any cell has (up to `views`)
    most = max(len(paths) for g in grid for paths in [g.get("reference", []), *g["policies"].values()])
    views = max(1, min(views, most))
    label_h, head_h, cell_w = 34, 32, views * tile + 16
    img = Image.new("RGB", (max(cell_w * len(cols) + 10, 480), head_h + len(grid) * (tile + label_h) + 10), "white")
    d = ImageDraw.Draw(img)
    f, f_small = font(16), font(13)
    for ci, c in enumerate(cols):
        d.text((10 + ci * cell_w, 8), c, fill="black", font=f)
        d.line([(10 + ci * cell_w, head_h - 4), (10 + ci * cell_w + views * tile, head_h - 4)], fill=(200, 200, 200))
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


def band_sheet(panels: list[tuple[str, str, dict]], path: Path, title: str = "", columns: int = 2,
               width: int = 600, height: int = 380) -> Path:
    """Panels of lines with shaded bands on one image, `columns` per row, each about width x height.
    A panel is (title, y label, curves), curves name -> (steps, mean, low, high): a line through the
    means with the band from low to high shaded. A name keeps its colour in every panel, and one
    legend for the whole figure sits right of the panels, where it covers no data."""
    rows = math.ceil(len(panels) / columns)
    names = list(dict.fromkeys(n for _, _, curves in panels for n in curves))
    style = {n: (PALETTE[i % len(PALETTE)], ("-", "--", ":")[i // len(PALETTE) % 3]) for i, n in enumerate(names)}
    legend_w = 40 + 7 * max((len(n) for n in names), default=0)
    fig = _figure(width * columns + legend_w, height * rows + (40 if title else 0))
    handles = {}
    for i, (panel_title, ylabel, curves) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        xs = []
        for name, (steps, mean, low, high) in curves.items():
            colour, dash = style[name]
            pts = [(x, m, lo, hi) for x, m, lo, hi in zip(steps, mean, low, high) if _finite(m)]
            if not pts:
                continue
            x, m, lo, hi = (list(v) for v in zip(*pts))
            xs += x
            ax.fill_between(x, lo, hi, color=colour, alpha=0.15, linewidth=0)
            # markers only where they stay apart (every eval step, not every training step of 100)
            handles[name], = ax.plot(x, m, color=colour, linestyle=dash, linewidth=1.8,
                                     marker="o" if len(x) <= 30 else None, markersize=4, label=name)
        if not xs:
            ax.text(0.5, 0.5, "nothing scored yet", transform=ax.transAxes, ha="center", va="center", color="#777777")
        # steps scored every 10: ticks on round multiples (0, 20, 40), not 0, 15, 30
        step_axes(ax, xs, panel_title, "training step", label_size=10, tick_steps=[1, 2, 5, 10])
        ax.set_ylabel(ylabel, fontsize=10)
        ax.tick_params(labelsize=9)
    if title:
        fig.suptitle(title, fontsize=12, x=0.01, ha="left")
    if handles:
        fig.legend([handles[n] for n in names if n in handles], [n for n in names if n in handles],
                   loc="outside right upper", frameon=False, fontsize=10)
    return _save_figure(fig, path)
