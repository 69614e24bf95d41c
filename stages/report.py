"""The eval report: Markdown + a self-contained HTML page (PNG plots embedded as base64) + the
PNG files themselves under OUT/plots/.

Contents: headline table (overall), per-metric tables of categories x policies with deltas vs the
first policy (coloured by whether the change is an improvement), bar charts per category, a grid
of renders (prompt x policy, several views), reward/metric curves of rl-step runs (--run), the
skipped metrics with their reasons, and the exact configs and policy ids (checkpoint hashes).
Charts are drawn with PIL (no plotting dependency).
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rl3d.formats.shards import atomic_path, atomic_write_bytes

ALL = "all"
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
METRIC_ORDER = ("clip_score", "kd_x100", "fd", "spec_accuracy", "spec_all_correct", "reference_iou",
                "single_component_rate", "grounded_rate", "stable_rate", "watertight_rate", "diversity_iou",
                "decode_failure_rate")
LABELS = {"clip_score": "CLIP score", "kd_x100": "KD x100", "fd": "FD", "spec_accuracy": "spec accuracy",
          "spec_all_correct": "spec all correct", "reference_iou": "IoU vs ground truth",
          "single_component_rate": "single component", "grounded_rate": "grounded", "stable_rate": "stable",
          "watertight_rate": "watertight", "diversity_iou": "diversity (pairwise IoU, lower = more diverse)",
          "decode_failure_rate": "decode failures"}


@dataclass
class ReportContext:
    bench: str
    bench_source: str
    bench_hash: str
    categories: list[str]
    policies: list[dict]            # name, policy_id, dir, mode, final_level, step, gen_config ...
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    grid: list[dict] = field(default_factory=list)   # see pick_grid
    runs: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- tables

def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


def metric_order(rows: list[dict]) -> list[str]:
    names = list(dict.fromkeys(r["metric"] for r in rows))
    known = [m for m in METRIC_ORDER if m in names]
    return known + sorted(m for m in names if m not in known)


def delta_table(rows: list[dict], metric: str, policies: list[str], categories: list[str]) -> list[dict]:
    """One metric as rows per category (+ "all"): value per policy, delta vs the first policy, and
    whether the delta is an improvement (True/False; None when the metric has no direction or a
    value is missing)."""
    idx = {(r["policy"], r["category"]): r for r in rows if r["metric"] == metric}
    out = []
    for c in [ALL, *categories]:
        vals = {p: idx.get((p, c), {}).get("value") for p in policies}
        if all(v is None for v in vals.values()):
            continue
        hib = next((idx[(p, c)].get("higher_is_better") for p in policies if (p, c) in idx), None)
        base = vals[policies[0]]
        deltas, better = {}, {}
        for p in policies[1:]:
            d = None if base is None or vals[p] is None else vals[p] - base
            deltas[p] = d
            better[p] = None if d is None or hib is None or d == 0 else (d > 0) == bool(hib)
        out.append({"category": c, "values": vals, "deltas": deltas, "better": better,
                    "n": {p: idx.get((p, c), {}).get("n") for p in policies}})
    return out


def skipped_reasons(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(policy, metric, reason) of skipped metrics, one line per distinct reason."""
    seen, out = set(), []
    for r in rows:
        if r["status"] != "ok":
            key = (r["policy"], r["metric"], r["message"])
            if key not in seen:
                seen.add(key)
                out.append(key)
    return out


def _delta_text(d, better) -> str:
    if d is None:
        return "-"
    arrow = "" if better is None else (" ▲" if better else " ▼")
    return f"{d:+.3f}{arrow}"


# ---------------------------------------------------------------- PIL charts

def _font(size: int):
    return ImageFont.load_default(size=size)


def _text_w(draw, text, font) -> float:
    return draw.textlength(text, font=font)


def bar_chart(title: str, groups: list[str], series: dict[str, list[float | None]], path: Path,
              ylabel: str = "", width: int = 900, height: int = 420) -> Path:
    """Grouped bars: one group per x label, one coloured bar per series (policy), value labels
    on the bars, a legend, y grid lines from 0 (or the data minimum when negative)."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    f_title, f, f_small = _font(18), _font(13), _font(11)
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
            lab = _fmt(v)
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
    f_title, f, f_small = _font(18), _font(13), _font(11)
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
    f, f_small = _font(14), _font(12)
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


def pick_grid(prompts: list[dict], samples: dict[str, dict[str, list[str]]], refs: dict[str, list[str]],
              n: int) -> list[dict]:
    """Up to n prompts for the render grid, round-robin over categories (sample 0 of each policy)."""
    by_cat: dict[str, list[dict]] = {}
    for r in prompts:
        by_cat.setdefault(r["category"], []).append(r)
    picked, k = [], 0
    while len(picked) < n and any(k < len(v) for v in by_cat.values()):
        for rows in by_cat.values():
            if k < len(rows) and len(picked) < n:
                r = rows[k]
                pol = {p: s.get(r["prompt_id"], []) for p, s in samples.items()}
                if any(pol.values()):
                    picked.append({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "category": r["category"],
                                   "reference": refs.get(r["prompt_id"], []), "policies": pol})
        k += 1
    return picked


def _save(img: Image.Image, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)
    return path


# ---------------------------------------------------------------- run curves

def read_run_metrics(path: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """A run-level metrics Parquet (columns step, name, value), or a dir holding one -> name -> (steps, values)."""
    import pyarrow.parquet as pq

    from rl3d.formats.errors import InputError

    p = Path(path)
    files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
    if not files or not files[0].exists():
        raise InputError(f"--run {path}: no run metrics Parquet (columns step, name, value)")
    out: dict[str, list[tuple[float, float]]] = {}
    for f in files:
        t = pq.read_table(f)
        for c in ("step", "name", "value"):
            if c not in t.column_names:
                raise InputError(f"{f}: missing column {c!r} for run metrics (step, name, value)")
        for s, n, v in zip(*(t.column(c).to_pylist() for c in ("step", "name", "value"))):
            if v is not None:
                out.setdefault(n, []).append((float(s), float(v)))
    return {n: ([s for s, _ in sorted(v)], [x for _, x in sorted(v)]) for n, v in out.items()}


def curve_charts(runs: list[str], plots: Path, max_charts: int = 12) -> list[Path]:
    """One chart per metric name (reward/loss/kl...), one line per run."""
    data = {Path(r).stem if Path(r).is_file() else Path(r).name: read_run_metrics(r) for r in runs}
    names = list(dict.fromkeys(n for d in data.values() for n in d))
    key = ("reward", "total", "loss", "kl", "clip", "entropy", "advantage")
    names.sort(key=lambda n: (not any(k in n for k in key), n))
    out = []
    for n in names[:max_charts]:
        curves = {run: d[n] for run, d in data.items() if n in d}
        out.append(line_chart(n, curves, plots / f"curve-{_slug(n)}.png"))
    return out


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


# ---------------------------------------------------------------- the report

def write_report(rows: list[dict], out: str | Path, ctx: ReportContext) -> dict:
    """report.md, report.html and plots/*.png under out -> their paths."""
    out = Path(out)
    plots = out / "plots"
    policies = [p["name"] for p in ctx.policies]
    metrics = metric_order(rows)
    charts: list[tuple[str, Path]] = []
    for m in metrics:
        if ":" in m:
            continue
        vals = {p: [next((r["value"] for r in rows if r["policy"] == p and r["category"] == c and r["metric"] == m),
                         None) for c in [*ctx.categories, ALL]] for p in policies}
        if any(v is not None for vs in vals.values() for v in vs):
            charts.append((m, bar_chart(f"{LABELS.get(m, m)} by category", [*ctx.categories, "ALL"], vals,
                                        plots / f"bar-{_slug(m)}.png")))
    attrs = [m for m in metrics if m.startswith("spec_accuracy:")]
    if attrs:
        vals = {p: [next((r["value"] for r in rows if r["policy"] == p and r["category"] == ALL and r["metric"] == a),
                         None) for a in attrs] for p in policies}
        charts.append(("spec attributes", bar_chart("spec accuracy per attribute (all categories)",
                                                    [a.split(":", 1)[1] for a in attrs], vals,
                                                    plots / "bar-spec-attributes.png", width=max(900, 90 * len(attrs)))))
    grid_png = render_grid(ctx.grid, policies, plots / "grid.png")
    curves = curve_charts(ctx.runs, plots) if ctx.runs else []

    md = _markdown(rows, ctx, policies, metrics, charts, grid_png, curves, out)
    page = _html(rows, ctx, policies, metrics, charts, grid_png, curves)
    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_bytes(md_path, md.encode())
    atomic_write_bytes(html_path, page.encode())
    return {"report_md": md_path, "report_html": html_path, "plots": plots}


def _headline(rows, policies, metrics) -> list[tuple[str, dict, dict, dict]]:
    out = []
    for m in metrics:
        if ":" in m:
            continue
        t = delta_table(rows, m, policies, [])
        if t:
            out.append((m, t[0]["values"], t[0]["deltas"], t[0]["better"]))
    return out


def _markdown(rows, ctx: ReportContext, policies, metrics, charts, grid_png, curves, out: Path) -> str:
    rel = lambda p: str(Path(p).relative_to(out))  # noqa: E731
    L = [f"# rl3d eval: {ctx.bench}", "",
         f"Benchmark `{ctx.bench}` ({ctx.bench_source}, content hash `{ctx.bench_hash}`), "
         f"categories: {', '.join(ctx.categories)}.", ""]
    L += [f"- {n}" for n in ctx.notes] + [""]
    L += ["## Policies", "", "| policy | mode (level) | step | policy_id |", "|---|---|---|---|"]
    L += [f"| {p['name']} | {p['mode']} ({p['final_level']}) | {p.get('step', '')} | `{p.get('policy_id')}` |"
          for p in ctx.policies]
    L += ["", "## Overall", "", "| metric | " + " | ".join(policies)
          + "".join(f" | Δ {p}" for p in policies[1:]) + " |", "|---" * (1 + 2 * len(policies) - 1) + "|"]
    for m, vals, deltas, better in _headline(rows, policies, metrics):
        L.append(f"| {LABELS.get(m, m)} | " + " | ".join(_fmt(vals[p]) for p in policies)
                 + "".join(f" | {_delta_text(deltas[p], better[p])}" for p in policies[1:]) + " |")
    L += ["", "Δ = policy minus the first policy; ▲ better, ▼ worse (by the metric's direction).", ""]
    L += ["## Per category", ""]
    for m in metrics:
        t = delta_table(rows, m, policies, ctx.categories)
        if not t:
            continue
        L += [f"### {LABELS.get(m, m)}", "", "| category | " + " | ".join(policies)
              + "".join(f" | Δ {p}" for p in policies[1:]) + " | n |", "|---" * (2 + 2 * len(policies) - 1) + "|"]
        for r in t:
            L.append(f"| {r['category']} | " + " | ".join(_fmt(r['values'][p]) for p in policies)
                     + "".join(f" | {_delta_text(r['deltas'][p], r['better'][p])}" for p in policies[1:])
                     + f" | {'/'.join(str(r['n'][p] or 0) for p in policies)} |")
        L.append("")
    sk = skipped_reasons(rows)
    if sk:
        L += ["## Skipped metrics", ""] + [f"- {p}: **{m}**: {why}" for p, m, why in sk] + [""]
    if charts:
        L += ["## Charts", ""] + [f"![{m}]({rel(p)})" for m, p in charts] + [""]
    if grid_png:
        L += ["## Renders (sample 0 of each policy)", "", f"![renders]({rel(grid_png)})", ""]
    if curves:
        L += ["## Training curves", ""] + [f"![curve]({rel(p)})" for p in curves] + [""]
    L += ["## Configs", "", "```json", json.dumps({"eval": ctx.config, "gen": {p["name"]: p.get("gen_config")
                                                                               for p in ctx.policies}},
                                                  indent=2, sort_keys=True, default=str), "```", ""]
    return "\n".join(L)


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ddd;padding:4px 10px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}.better{color:#1a7f37}.worse{color:#c62828}
.skip{color:#888}img{max-width:100%;border:1px solid #eee;margin:.5em 0}code,pre{background:#f6f8fa}
pre{padding:1em;overflow:auto;font-size:12px}.note{color:#555}"""


def _html(rows, ctx: ReportContext, policies, metrics, charts, grid_png, curves) -> str:
    e = html.escape
    H = [f"<!doctype html><html><head><meta charset='utf-8'><title>rl3d eval: {e(ctx.bench)}</title>"
         f"<style>{_CSS}</style></head><body>",
         f"<h1>rl3d eval: {e(ctx.bench)}</h1>",
         f"<p>Benchmark <code>{e(ctx.bench)}</code> ({e(ctx.bench_source)}, content hash "
         f"<code>{e(ctx.bench_hash)}</code>); categories: {e(', '.join(ctx.categories))}.</p>",
         "<ul>" + "".join(f"<li class='note'>{e(n)}</li>" for n in ctx.notes) + "</ul>",
         "<h2>Policies</h2><table><tr><th>policy</th><th>mode (level)</th><th>step</th><th>policy_id</th></tr>"]
    H += [f"<tr><td>{e(p['name'])}</td><td>{e(p['mode'])} ({e(p['final_level'])})</td><td>{p.get('step', '')}</td>"
          f"<td><code>{e(str(p.get('policy_id')))}</code></td></tr>" for p in ctx.policies]
    H.append("</table>")

    def delta_cell(d, b):
        cls = "" if b is None else ("better" if b else "worse")
        return f"<td class='{cls}'>{e(_delta_text(d, b))}</td>"

    head = "".join(f"<th>{e(p)}</th>" for p in policies) + "".join(f"<th>Δ {e(p)}</th>" for p in policies[1:])
    H.append(f"<h2>Overall</h2><table><tr><th>metric</th>{head}</tr>")
    for m, vals, deltas, better in _headline(rows, policies, metrics):
        H.append(f"<tr><td>{e(LABELS.get(m, m))}</td>" + "".join(f"<td>{_fmt(vals[p])}</td>" for p in policies)
                 + "".join(delta_cell(deltas[p], better[p]) for p in policies[1:]) + "</tr>")
    H.append("</table><p class='note'>Δ = policy minus the first policy; green = better, red = worse.</p>")
    H.append("<h2>Per category</h2>")
    for m in metrics:
        t = delta_table(rows, m, policies, ctx.categories)
        if not t:
            continue
        H.append(f"<h3>{e(LABELS.get(m, m))}</h3><table><tr><th>category</th>{head}<th>n</th></tr>")
        for r in t:
            H.append(f"<tr><td>{e(r['category'])}</td>" + "".join(f"<td>{_fmt(r['values'][p])}</td>" for p in policies)
                     + "".join(delta_cell(r["deltas"][p], r["better"][p]) for p in policies[1:])
                     + f"<td>{'/'.join(str(r['n'][p] or 0) for p in policies)}</td></tr>")
        H.append("</table>")
    sk = skipped_reasons(rows)
    if sk:
        H.append("<h2>Skipped metrics</h2><ul>" + "".join(
            f"<li class='skip'>{e(p)}: <b>{e(m)}</b>: {e(why)}</li>" for p, m, why in sk) + "</ul>")
    if charts:
        H.append("<h2>Charts</h2>" + "".join(_img_tag(p, m) for m, p in charts))
    if grid_png:
        H.append("<h2>Renders (sample 0 of each policy)</h2>" + _img_tag(grid_png, "renders"))
    if curves:
        H.append("<h2>Training curves</h2>" + "".join(_img_tag(p, "curve") for p in curves))
    cfg = json.dumps({"eval": ctx.config, "gen": {p["name"]: p.get("gen_config") for p in ctx.policies}},
                     indent=2, sort_keys=True, default=str)
    H.append(f"<h2>Configs</h2><details><summary>exact configs</summary><pre>{e(cfg)}</pre></details></body></html>")
    return "\n".join(H)
