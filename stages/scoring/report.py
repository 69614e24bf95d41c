"""The eval report: Markdown + a self-contained HTML page (PNG plots embedded as base64) + the
PNG files themselves under OUT/plots/.

Contents: headline table (overall), per-metric tables of categories x policies with deltas vs the
first policy (coloured by whether the change is an improvement), bar charts per category, a grid
of renders (prompt x policy, several views), reward/metric curves of rl-step runs (--run), the
skipped metrics with their reasons, and the exact configs and policy ids (checkpoint hashes).
A value resting on fewer than FEW samples is marked and explained, and no delta from a single
sample is called better or worse. Charts come from scoring/charts.py (matplotlib); metric order, labels and formats from scoring/registry.py.
"""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from rl3d.formats.shards import atomic_write_bytes
from rl3d.stages.scoring import registry
from rl3d.stages.scoring.charts import bar_chart, line_chart, render_grid
from rl3d.stages.scoring.registry import format_value
from rl3d.stages.scoring.run_metrics import read_run_metrics

ALL = "all"
FEW = 8          # a value resting on fewer samples than this is marked and explained
FEW_MARK = "†"


@dataclass
class ReportContext:
    bench: str
    bench_source: str
    bench_hash: str
    categories: list[str]
    policies: list[dict]            # name, policy_id, dir, mode, final_level, step (SFT), rl_step, gen_config ...
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    grid: list[dict] = field(default_factory=list)   # see pick_grid
    runs: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- tables

def metric_order(rows: list[dict]) -> list[str]:
    return registry.metric_order(r["metric"] for r in rows)


def delta_table(rows: list[dict], metric: str, policies: list[str], categories: list[str]) -> list[dict]:
    """One metric as rows per category (+ "all"): value per policy, delta vs the first policy, and
    whether the delta is an improvement (True/False; None when the metric has no direction or a
    value is missing)."""
    idx = {(r["policy"], r["category"]): r for r in rows if r["metric"] == metric}
    # no better/worse verdict from a single sample on either side: a difference of one draw
    out = []
    for c in [ALL, *categories]:
        vals = {p: idx.get((p, c), {}).get("value") for p in policies}
        if all(v is None for v in vals.values()):
            continue
        hib = next((idx[(p, c)].get("higher_is_better") for p in policies if (p, c) in idx), None)
        base = vals[policies[0]]
        n = {p: idx.get((p, c), {}).get("n") for p in policies}
        deltas, better = {}, {}
        for p in policies[1:]:
            d = None if base is None or vals[p] is None else vals[p] - base
            deltas[p] = d
            single = (n[policies[0]] or 0) <= 1 or (n[p] or 0) <= 1
            better[p] = None if d is None or hib is None or d == 0 or single else (d > 0) == bool(hib)
        out.append({"category": c, "values": vals, "deltas": deltas, "better": better, "n": n})
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


def few(n) -> bool:
    """A value from 1..FEW-1 samples (0 = no value at all, shown as "-")."""
    return bool(n) and n < FEW


def _value_text(v, n) -> str:
    text = format_value(v)
    return text + FEW_MARK if v is not None and few(n) else text


def few_note(tables: list[list[dict]], policies: list[str]) -> str:
    """One sentence when any shown value rests on fewer than FEW samples, else ""."""
    smallest = [r["n"][p] for t in tables for r in t for p in policies if r["values"][p] is not None and few(r["n"][p])]
    if not smallest:
        return ""
    return (f"{FEW_MARK} = fewer than {FEW} samples behind the value (as few as {min(smallest)}): "
            f"read it as an anecdote, not a measurement (more prompts: a larger --limit or none; more samples: --samples-per-prompt). "
            f"With n = 1 no delta is called better or worse.")


def _delta_text(d, better) -> str:
    if d is None:
        return "-"
    arrow = "" if better is None else (" ▲" if better else " ▼")
    return f"{d:+.3f}{arrow}"


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


# ---------------------------------------------------------------- run curves

# the order of the training curves: the first key a metric name contains ranks it
CURVE_ORDER = ("reward_mean", "total", "reward", "kl", "loss", "entropy", "advantage", "clip", "ratio")


def run_label(run: str | Path) -> str:
    """A run's name in the legend: its folder's name (rl-step's file is metrics.parquet inside the run
    folder, so a file is named by its folder too, unless it has a name of its own)."""
    p = Path(run)
    return (p.parent.resolve().name if p.stem == "metrics" else p.stem) if p.is_file() else p.resolve().name


def curve_charts(runs: list[str], plots: Path, max_charts: int = 12) -> list[Path]:
    """One chart per metric name, one line per run: rewards first, then KL, loss, entropy, advantages
    and clipping (CURVE_ORDER); a metric that never changes in any run comes after every one that does."""
    data: dict[str, dict] = {}
    for r in runs:
        label = run_label(r)
        while label in data:  # two runs of the same folder name stay two lines
            label += "'"
        data[label] = read_run_metrics(r)
    names = list(dict.fromkeys(n for d in data.values() for n in d))

    def rank(n: str) -> tuple:
        flat = all(len(set(d[n][1])) <= 1 for d in data.values() if n in d)
        return flat, next((i for i, k in enumerate(CURVE_ORDER) if k in n), len(CURVE_ORDER)), n

    names.sort(key=rank)
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
            charts.append((m, bar_chart(f"{registry.label(m)} by category", [*ctx.categories, "ALL"], vals,
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


def _headline(rows, policies, metrics) -> list[tuple[str, dict]]:
    """(metric, its overall row of delta_table) per metric with a value."""
    out = []
    for m in metrics:
        if ":" in m:
            continue
        t = delta_table(rows, m, policies, [])
        if t:
            out.append((m, t[0]))
    return out


def _n_text(n: dict, policies) -> str:
    return "/".join(str(n[p] or 0) for p in policies)


def _policy_steps(p: dict) -> tuple[str, str]:
    """(SFT step, RL step); eval records of before sft_step name the SFT step "step"."""
    return str(p.get("sft_step", p.get("step", ""))), str(p.get("rl_step", ""))


def _markdown(rows, ctx: ReportContext, policies, metrics, charts, grid_png, curves, out: Path) -> str:
    rel = lambda p: str(Path(p).relative_to(out))  # noqa: E731
    L = [f"# rl3d eval: {ctx.bench}", "",
         f"Benchmark `{ctx.bench}` ({ctx.bench_source}, content hash `{ctx.bench_hash}`), "
         f"categories: {', '.join(ctx.categories)}.", ""]
    L += [f"- {n}" for n in ctx.notes] + [""]
    headline = _headline(rows, policies, metrics)
    per_cat = [(m, delta_table(rows, m, policies, ctx.categories)) for m in metrics]
    per_cat = [(m, t) for m, t in per_cat if t]
    note = few_note([[r for _, r in headline]] + [t for _, t in per_cat], policies)
    if note:
        L += [f"> **Few samples.** {note}", ""]
    L += ["## Policies", "", "| policy | mode (level) | SFT step | RL step | policy_id |", "|---|---|---|---|---|"]
    L += [f"| {p['name']} | {p['mode']} ({p['final_level']}) | {' | '.join(_policy_steps(p))} | `{p.get('policy_id')}` |"
          for p in ctx.policies]
    L += ["", "## Overall", "", "| metric | " + " | ".join(policies)
          + "".join(f" | Δ {p}" for p in policies[1:]) + " | n |", "|---" * (2 + 2 * len(policies) - 1) + "|"]
    for m, r in headline:
        L.append(f"| {registry.label(m)} | " + " | ".join(_value_text(r['values'][p], r['n'][p]) for p in policies)
                 + "".join(f" | {_delta_text(r['deltas'][p], r['better'][p])}" for p in policies[1:])
                 + f" | {_n_text(r['n'], policies)} |")
    L += ["", "Δ = policy minus the first policy; ▲ better, ▼ worse (by the metric's direction); "
          "n = samples (views for KD/FD) per policy.", ""]
    L += ["## Per category", ""]
    for m, t in per_cat:
        L += [f"### {registry.label(m)}", "", "| category | " + " | ".join(policies)
              + "".join(f" | Δ {p}" for p in policies[1:]) + " | n |", "|---" * (2 + 2 * len(policies) - 1) + "|"]
        for r in t:
            L.append(f"| {r['category']} | " + " | ".join(_value_text(r['values'][p], r['n'][p]) for p in policies)
                     + "".join(f" | {_delta_text(r['deltas'][p], r['better'][p])}" for p in policies[1:])
                     + f" | {_n_text(r['n'], policies)} |")
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


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em}table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ddd;padding:4px 10px;
text-align:right;font-variant-numeric:tabular-nums}th:first-child,td:first-child{text-align:left}th{background:#f4f4f4}
.better{color:#1a7f37}.worse{color:#c62828}.few{color:#8a6d00}.n{color:#777}
.warn{background:#fff8e1;border-left:4px solid #f0b400;padding:.6em 1em;margin:1em 0}
.skip{color:#888}img{max-width:100%;border:1px solid #eee;margin:.5em 0;display:block}code,pre{background:#f6f8fa}
pre{padding:1em;overflow:auto;font-size:12px}.note{color:#555}"""


def _html(rows, ctx: ReportContext, policies, metrics, charts, grid_png, curves) -> str:
    e = html.escape
    headline = _headline(rows, policies, metrics)
    per_cat = [(m, delta_table(rows, m, policies, ctx.categories)) for m in metrics]
    per_cat = [(m, t) for m, t in per_cat if t]
    note = few_note([[r for _, r in headline]] + [t for _, t in per_cat], policies)
    H = [f"<!doctype html><html><head><meta charset='utf-8'><title>rl3d eval: {e(ctx.bench)}</title>"
         f"<style>{_CSS}</style></head><body>",
         f"<h1>rl3d eval: {e(ctx.bench)}</h1>",
         f"<p>Benchmark <code>{e(ctx.bench)}</code> ({e(ctx.bench_source)}, content hash "
         f"<code>{e(ctx.bench_hash)}</code>); categories: {e(', '.join(ctx.categories))}.</p>",
         "<ul>" + "".join(f"<li class='note'>{e(n)}</li>" for n in ctx.notes) + "</ul>"]
    if note:
        H.append(f"<p class='warn'><b>Few samples.</b> {e(note)}</p>")
    H.append("<h2>Policies</h2><table><tr><th>policy</th><th>mode (level)</th><th>SFT step</th><th>RL step</th>"
             "<th>policy_id</th></tr>")
    H += [f"<tr><td>{e(p['name'])}</td><td>{e(p['mode'])} ({e(p['final_level'])})</td>"
          + "".join(f"<td>{e(s)}</td>" for s in _policy_steps(p))
          + f"<td><code>{e(str(p.get('policy_id')))}</code></td></tr>" for p in ctx.policies]
    H.append("</table>")

    def value_cell(v, n):
        if v is not None and few(n):
            return f"<td class='few' title='only {n} samples'>{e(_value_text(v, n))}</td>"
        return f"<td>{e(format_value(v))}</td>"

    def delta_cell(d, b):
        cls = "" if b is None else ("better" if b else "worse")
        return f"<td class='{cls}'>{e(_delta_text(d, b))}</td>"

    def row_html(first, r):
        return (f"<tr><td>{e(first)}</td>" + "".join(value_cell(r["values"][p], r["n"][p]) for p in policies)
                + "".join(delta_cell(r["deltas"][p], r["better"][p]) for p in policies[1:])
                + f"<td class='n'>{_n_text(r['n'], policies)}</td></tr>")

    head = "".join(f"<th>{e(p)}</th>" for p in policies) + "".join(f"<th>Δ {e(p)}</th>" for p in policies[1:])
    H.append(f"<h2>Overall</h2><table><tr><th>metric</th>{head}<th>n</th></tr>")
    H += [row_html(registry.label(m), r) for m, r in headline]
    H.append("</table><p class='note'>Δ = policy minus the first policy; green = better, red = worse; "
             "n = samples (views for KD/FD) per policy.</p>")
    H.append("<h2>Per category</h2>")
    for m, t in per_cat:
        H.append(f"<h3>{e(registry.label(m))}</h3><table><tr><th>category</th>{head}<th>n</th></tr>")
        H += [row_html(r["category"], r) for r in t]
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
