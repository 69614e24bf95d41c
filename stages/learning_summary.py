"""`rl3d learning-summary`: what a learning run did, as tables and images (one function per
subcommand; the library is stages/scoring/learning.py)."""
from __future__ import annotations

import json
from pathlib import Path

from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.stages.experiments.ablations import group_spread, nucleus_frozen
from rl3d.stages.experiments.summary import summarize
from rl3d.stages.scoring.learning import (before_after_sheet, eval_rows, heldout_table, paired_prompt_change,
                                          plot_runs, reward_variance_shares)


def heldout(run: Path) -> list[str]:
    """RUN/heldout_rewards.json (one row per evaluated step) -> the table's lines."""
    run = Path(run)
    rows = heldout_table(run)
    if not rows:  # nothing to summarise: say so instead of writing an empty table
        raise InputError(f"{run}: no held-out scores (complete eval/step-NNNNNN/seed-S/rewards tables, as "
                         f"examples/learning_run.sh writes them); nothing written")
    (run / "heldout_rewards.json").write_text(json.dumps(rows, indent=2))
    keys = [k for k in rows[0] if not k.endswith("_seed_std") and k not in ("step", "seeds")] if rows else []
    return ["step  " + "  ".join(keys)] + [f"{r['step']:>4}  " + "  ".join(f"{r[k]:.4f}" for k in keys) for r in rows]


def plot(out: Path, runs: list[str]) -> Path:
    """LABEL=DIR pairs -> one image of the learning curves of those runs."""
    bad = [r for r in runs if "=" not in r]
    if bad:
        raise InputError(f"{bad[0]}: expected LABEL=DIR (a run folder with metrics.parquet and heldout_rewards.json)")
    return plot_runs(Path(out), {label: Path(d) for label, d in (r.split("=", 1) for r in runs)})


def drivers(reward_dirs: list[str]) -> list[str]:
    """Share of each reward term in the within-group variance of the total, per level."""
    rows = [r for d in reward_dirs for r in tables.read_table(Path(d), "rewards").to_pylist()]
    return [f"{level:8s} {term:24s} {share:+.3f}" for (level, term), share in reward_variance_shares(rows).items()]


def compare(run: Path, step_a: int, step_b: int) -> list[str]:
    """Paired change per held-out prompt from step A to step B, per level."""
    rows_a, rows_b = eval_rows(Path(run), step_a), eval_rows(Path(run), step_b)
    lines = []
    for level in ("coarse", "fine"):
        c = paired_prompt_change(rows_a, rows_b, level)
        if c["prompts"]:
            lines.append(f"{level:6s} step {step_a} -> {step_b}: {c['change']:+.4f}  95% CI [{c['ci_low']:+.4f}, "
                         f"{c['ci_high']:+.4f}] over {c['prompts']} prompts, {c['improved']} improved")
    return lines


def samples(run: Path, step_a: int, step_b: int, out: Path) -> Path:
    """The before/after sheet of renders (the most improved, unchanged and worsened prompts)."""
    before_after_sheet(Path(run), step_a, step_b, Path(out))
    return Path(out)


def ablations(exp_dir: Path, out: Path) -> list[str]:
    """An experiment of examples/ablations/ -> its Markdown section, images and numbers in OUT."""
    return [str(p) for p in summarize(Path(exp_dir), Path(out)).values() if p]


def spread(reward_dirs: list[str]) -> list[str]:
    """Within-group spread per level over the given rewards tables; the same prompt in two tables
    (two batches) is two groups."""
    rows = [{**r, "prompt_id": f"{i}:{r['prompt_id']}"}
            for i, d in enumerate(reward_dirs) for r in tables.read_table(Path(d), "rewards").to_pylist()]
    return [f"{level:8s} {k:32s} {v:.4f}" for level, stats in group_spread(rows).items() for k, v in stats.items()]


def nucleus(gen_dirs: list[str]) -> list[str]:
    """The share of sampled tokens top-p could not vary, per level and span, over the samples tables."""
    rows = [r for d in gen_dirs for r in tables.read_table(Path(d), "samples").to_pylist()]
    return [f"{level:8s} {span:10s} tokens {v['tokens']:>8d}  frozen by top-p {v['frozen']:.3f}  "
            f"mean -log p {v['entropy_estimate']:.4f}" for (level, span), v in nucleus_frozen(rows).items()]
