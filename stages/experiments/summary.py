"""One experiment folder of examples/ablations/ -> its summary: OUT/<folder>.md, the figures and the
numbers as JSON. The per-arm tables and figures come from ablations.py, the arm-against-arm
findings from findings.py; this module only puts them together."""
from __future__ import annotations

import json
from pathlib import Path

from rl3d.stages.experiments.ablations import (BENCH_METRICS, DEFAULT_METRICS, LABELS, Experiment, arm_rows, cell,
                                               category_rows, experiment_commands, heldout_curves, load_experiment,
                                               paired_cell, plot_curves, plot_heldout, render_sheet, scored_seeds,
                                               unscored_runs, wall_times)
from rl3d.stages.experiments.findings import METHOD, finding_rows, finding_table


def markdown(exp: Experiment, curves: Path | None, grid: Path | None, findings: list[dict] | None = None,
             heldout: Path | None = None) -> list[str]:
    """The experiment's section: settings, the findings table (`findings`, findings.finding_rows) and
    the learning-curves figure (`heldout`) first, then per benchmark the tables, wall time, commands."""
    name = exp.meta["experiment"]
    s = exp.meta["settings"]
    lines = [f"## Experiment: {name}" + (f" (folder {exp.folder})" if exp.folder != name else ""), "",
             f"{len(exp.arms)} arms, seeds per arm (scored): " +
             ", ".join(f"{a} {len(scored_seeds(exp, a))}" for a in exp.arms) +
             f". Training: {s['STEPS']} steps of {s['PROMPTS']} synth train prompts x G={s['GROUP']}, lr {s['LR']}, "
             f"{s['MINIBATCH']} sequences per update, beta {s['BETA']} (unless the arm says otherwise), "
             f"starting weights `{exp.meta['start_weights']}`. Held-out: `rl3d eval` at seed {s['EVAL_SEED']}, "
             f"{s['EVAL_SAMPLES']} samples per prompt, " +
             (f"first {s['BENCH_LIMIT']} prompt(s) per category" if s.get("BENCH_LIMIT") else "the whole benchmark") +
             ". `±`: 95% t-interval over seeds; `paired`: change from the arm's starting policy per held-out "
             "prompt (seeds pooled), 95% bootstrap interval over prompts, prompts improved.", ""]
    unscored = unscored_runs(exp)
    if unscored:
        lines += ["Not scored yet (the tables hold only the steps scored; training curves are drawn): " +
                  ", ".join(f"{arm} seed {seed} (step {', '.join(missing)}; reached step {step})"
                            for arm, seed, missing, step in unscored) + ".", ""]
    if findings:
        lines += ["### Findings", "", METHOD.format(script=name), "", *finding_table(findings), ""]
    if heldout:
        lines += [f"![{name}: learning curves per arm, mean and seed band]({heldout.name})", ""]
    for bench in sorted({e.bench for e in exp.evals}):
        metrics = BENCH_METRICS.get(bench, DEFAULT_METRICS)
        rows = arm_rows(exp, bench)
        lines += [f"### {bench}", "", "| arm | step | seeds | " + " | ".join(LABELS.get(m, m) for m in metrics) + " |",
                  "|---|---|---|" + "---|" * len(metrics)]
        lines += [f"| {r['arm']} | {r['step']} | {r['seeds']} | " + " | ".join(cell(r[m]) for m in metrics) + " |"
                  for r in rows]
        lines += ["", f"Paired change from the starting policy ({bench}):", "",
                  "| arm | step | vs | " + " | ".join(LABELS.get(m, m) for m in metrics[:3]) + " |",
                  "|---|---|---|" + "---|" * len(metrics[:3])]
        lines += [f"| {r['arm']} | {r['step']} | {r['baseline']} | " +
                  " | ".join(paired_cell(r[m]["paired"]) for m in metrics[:3]) + " |"
                  for r in rows if r["seeds"] and "paired" in r[metrics[0]]]
        cats, crows = category_rows(exp, bench, metrics[0])
        lines += ["", f"{LABELS.get(metrics[0], metrics[0])} per category ({bench}, last step, mean over seeds):", "",
                  "| arm | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
        lines += [f"| {r['arm']} | " + " | ".join(cell(r[c], 2) for c in cats) + " |" for r in crows]
        lines.append("")
    lines += ["### Wall time", "", "| arm | runs | training (s) | held-out scoring (s) | machine |", "|---|---|---|---|---|"]
    lines += [f"| {w['arm']} | {w['runs']} | {w['train_s']:.0f} | {w['eval_s']:.0f} | {', '.join(w['cards'])} |"
              for w in wall_times(exp)]
    lines += ["", "### Commands", "", "```", *experiment_commands(exp), "```", ""]
    if curves:
        lines += [f"![{name}: training curves]({curves.name})", ""]
    if grid:
        lines += [f"![{name}: held-out renders, start and after training]({grid.name})", ""]
    return lines


def summarize(exp_dir: Path, out: Path) -> dict:
    """Write OUT/<folder>.md, <folder>_learning.png (held-out learning curves and KL),
    <folder>_curves.png (training curves), <folder>_renders.png and <folder>.json (the numbers, the
    findings and the learning curves' data), <folder> being the experiment folder's name; return the paths."""
    exp = load_experiment(exp_dir)
    findings = finding_rows(exp)  # first: a comparison it refuses writes nothing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # named after the folder, not the experiment: one experiment run at other sizes in another
    # folder must not overwrite the first one's summary
    name = exp.folder
    learning = heldout_curves(exp)
    heldout = plot_heldout(exp, out / f"{name}_learning.png", learning) if exp.arms else None
    curves = plot_curves(exp, out / f"{name}_curves.png") if exp.arms else None
    grid = render_sheet(exp, out / f"{name}_renders.png")
    md = out / f"{name}.md"
    md.write_text("\n".join(markdown(exp, curves, grid, findings, heldout)))
    numbers = {bench: arm_rows(exp, bench) for bench in sorted({e.bench for e in exp.evals})}
    (out / f"{name}.json").write_text(json.dumps({"experiment": exp.meta, "results": numbers,
                                                  "findings": findings, "learning_curves": learning,
                                                  "wall": wall_times(exp)}, indent=2))
    return {"markdown": md, "learning": heldout, "curves": curves, "renders": grid, "numbers": out / f"{name}.json"}
