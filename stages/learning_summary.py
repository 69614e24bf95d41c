"""Summarise a learning run (examples/learning_run.sh): held-out reward per evaluated step, per
level and per reward term, mean and spread over sampling seeds; `total_*` is the mean over scored
samples and `failed_*` the share of samples without a reward (empty meshes).

    python -m rl3d.stages.learning_summary RUN                       # RUN/heldout_rewards.json + table
    python -m rl3d.stages.learning_summary plot OUT.png LABEL=DIR ...  # curves of one or more runs
    python -m rl3d.stages.learning_summary drivers REWARDS_DIR ...     # which terms the advantages follow

A plotted DIR holds metrics.parquet (rl-step's run metrics) and heldout_rewards.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from rl3d.formats import tables


def heldout_table(run: Path) -> list[dict]:
    rows = []
    for step_dir in sorted((run / "eval").glob("step-*")):
        per_seed: dict[str, list[float]] = {}
        for seed_dir in sorted(step_dir.glob("seed-*")):
            if not (seed_dir / "rewards" / "_manifest.json").exists():
                continue
            t = tables.read_table(seed_dir / "rewards", "rewards").to_pylist()
            for level in ("coarse", "fine"):
                lv = [r for r in t if r["level"] == level]
                vals = [r["total"] for r in lv if r["total"] is not None]
                per_seed.setdefault(f"total_{level}", []).append(float(np.mean(vals)))
                # failed samples (empty meshes) have no total: their share is reported beside it
                per_seed.setdefault(f"failed_{level}", []).append(1.0 - len(vals) / len(lv))
                for term in sorted({k[:-4] for k in t[0] if k.endswith("_raw")}):
                    v = [r[f"{term}_raw"] for r in t if r["level"] == level and r.get(f"{term}_raw") is not None]
                    if v:
                        per_seed.setdefault(f"{term}_{level}", []).append(float(np.mean(v)))
        if per_seed:
            row = {"step": int(step_dir.name.split("-")[1]), "seeds": len(per_seed["total_fine"])}
            for k, v in per_seed.items():
                row[k] = float(np.mean(v))
                row[k + "_seed_std"] = float(np.std(v))
            rows.append(row)
    return rows


def plot_runs(out: Path, runs: dict[str, Path]) -> Path:
    """One image of four charts: training batch reward (fine), held-out reward per level, held-out
    fine CLIP score, and log10 KL to the initial policy; one line per run (and level)."""
    import tempfile

    from PIL import Image

    from rl3d.stages.report import line_chart, read_run_metrics

    charts = {"train": {}, "heldout": {}, "clip": {}, "kl": {}}
    for label, d in runs.items():
        m = read_run_metrics(Path(d) / "metrics.parquet")
        held = json.loads((Path(d) / "heldout_rewards.json").read_text())
        steps = [r["step"] for r in held]
        charts["train"][label] = m["reward_mean_fine"]
        for level, short in (("coarse", "R_high"), ("fine", "R_low")):
            charts["heldout"][f"{label} {short}"] = (steps, [r[f"total_{level}"] for r in held])
        charts["clip"][label] = (steps, [r["clip_score_fine"] for r in held])
        kl = [(x, float(np.log10(y))) for x, y in zip(*m["kl"]) if y > 0]  # a first step's KL is 0
        charts["kl"][label] = ([x for x, _ in kl], [y for _, y in kl])
    titles = {"train": "training batch R_low (fresh train prompts each step)",
              "heldout": "held-out reward (synth eval prompts, mean over seeds)",
              "clip": "held-out CLIP score, fine level", "kl": "log10 KL to the initial policy (k3)"}
    with tempfile.TemporaryDirectory() as tmp:
        tiles = [Image.open(line_chart(titles[k], charts[k], Path(tmp) / f"{k}.png")) for k in charts]
        w, h = tiles[0].size
        sheet = Image.new("RGB", (2 * w, 2 * h), "white")
        for i, tile in enumerate(tiles):
            sheet.paste(tile, ((i % 2) * w, (i // 2) * h))
    sheet.save(out)
    return out


def reward_variance_shares(rows: list[dict]) -> dict[tuple[str, str], float]:
    """Mean share of each term in the within-group variance of the level's total reward.

    GRPO's advantages are group-normalised totals, so a term's share cov(term, total) / var(total)
    inside each (prompt, level) group says how much of the learning signal it carries. Shares of a
    level sum to 1 (terms add up to the total). Groups without spread carry no signal and are skipped.
    """
    terms = sorted({k for r in rows for k, v in r.items() if isinstance(v, float) and k != "total"
                    and not k.endswith("_raw")})
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("total") is not None:
            groups.setdefault((r["prompt_id"], r["level"]), []).append(r)
    shares: dict[tuple[str, str], list[float]] = {}
    for (_, level), rs in groups.items():
        total = np.array([r["total"] for r in rs])
        var = total.var()
        if len(rs) < 2 or var < 1e-12:
            continue
        for t in terms:
            x = np.array([r[t] if isinstance(r.get(t), float) else np.nan for r in rs])
            if not np.isnan(x).all():
                cov = np.nanmean((x - np.nanmean(x)) * (total - total.mean()))
                shares.setdefault((level, t), []).append(float(cov / var))
    return {k: float(np.mean(v)) for k, v in sorted(shares.items())}


def main(argv=None):
    argv = list(argv or sys.argv[1:])
    if argv and argv[0] == "plot":
        runs = dict(a.split("=", 1) for a in argv[2:])
        print(plot_runs(Path(argv[1]), {k: Path(v) for k, v in runs.items()}))
        return
    if argv and argv[0] == "drivers":
        rows = [r for d in argv[1:] for r in tables.read_table(Path(d), "rewards").to_pylist()]
        for (level, term), share in reward_variance_shares(rows).items():
            print(f"{level:8s} {term:24s} {share:+.3f}")
        return
    run = Path(argv[0])
    rows = heldout_table(run)
    (run / "heldout_rewards.json").write_text(json.dumps(rows, indent=2))
    keys = [k for k in rows[0] if not k.endswith("_seed_std") and k not in ("step", "seeds")] if rows else []
    print("step  " + "  ".join(keys))
    for r in rows:
        print(f"{r['step']:>4}  " + "  ".join(f"{r[k]:.4f}" for k in keys))


if __name__ == "__main__":
    main()
