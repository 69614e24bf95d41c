"""The learning-summary library: what a learning run (examples/learning_run.sh) did, from its files.

Held-out reward per evaluated step, per level and per reward term, mean and spread over sampling
seeds (`total_*` is the mean over scored samples and `failed_*` the share of samples without a
reward: empty meshes); the paired change per held-out prompt between two steps; which reward
terms the advantages follow; a before/after sheet of renders; the learning curves of runs.
The command is `rl3d learning-summary` (cli/learning_summary.py, stages/learning_summary.py).

A plotted run DIR holds metrics.parquet (rl-step's run metrics) and heldout_rewards.json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from rl3d.formats import shards, tables
from rl3d.formats.errors import InputError
from rl3d.stages.scoring.charts import font, line_sheet
from rl3d.stages.scoring.run_metrics import read_run_metrics


def heldout_table(run: Path) -> list[dict]:
    rows = []
    for step_dir in sorted((run / "eval").glob("step-*")):
        per_seed: dict[str, list[float]] = {}
        for seed_dir in sorted(step_dir.glob("seed-*")):
            rewards = seed_dir / "rewards"
            # a seed still being scored (or cut off) is left out, not read half-written
            if shards.read_manifest(rewards) is None or shards.missing_shards(rewards):
                continue
            t = tables.read_table(rewards, "rewards").to_pylist()
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


def eval_rows(run: Path, step: int) -> list[dict]:
    """Every held-out reward row of one evaluated step, all sampling seeds together."""
    dirs = sorted((Path(run) / "eval" / f"step-{step:06d}").glob("seed-*/rewards"))
    if not dirs:
        raise InputError(f"{run}: no scored held-out step {step} (eval/step-{step:06d}/seed-*/rewards)")
    return [r for d in dirs for r in tables.read_table(d, "rewards").to_pylist()]


def prompt_means(rows, level: str) -> dict[str, float]:
    """Mean total of each prompt's scored samples of one level (failed samples have none)."""
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["level"] == level and r["total"] is not None:
            out.setdefault(r["prompt_id"], []).append(r["total"])
    return {k: float(np.mean(v)) for k, v in out.items()}


def paired_prompt_change(rows_a: list[dict], rows_b: list[dict], level: str, n_boot: int = 10000,
                         seed: int = 0) -> dict:
    """Change of one level's total from A to B, paired by prompt.

    Each prompt's score is the mean total of its scored samples (all seeds); the change is the mean
    over prompts of B - A, with a 95% bootstrap interval over prompts. Pairing removes the spread
    between prompts (easy and hard objects), which dominates the seed-mean comparison."""
    a, b = prompt_means(rows_a, level), prompt_means(rows_b, level)
    diff = np.array([b[k] - a[k] for k in sorted(set(a) & set(b))])
    if len(diff) == 0:
        return {"level": level, "prompts": 0}
    boot = diff[np.random.default_rng(seed).integers(0, len(diff), (n_boot, len(diff)))].mean(1)
    return {"level": level, "prompts": int(len(diff)), "change": float(diff.mean()),
            "ci_low": float(np.percentile(boot, 2.5)), "ci_high": float(np.percentile(boot, 97.5)),
            "improved": int((diff > 0).sum())}


def before_after_sheet(run: Path, step_a: int, step_b: int, out: Path, level: str = "fine",
                       n_prompts: int = 8, per_prompt: int = 4, tile: int = 128) -> list[str]:
    """One image to look at: view 0 of the first sampling seed's samples of one level, at step A
    (left) and step B (right), for the prompts whose mean total rose most, changed least and fell
    most. Returns the prompt ids shown, top to bottom."""
    def load(step):
        seed_dir = sorted((Path(run) / "eval" / f"step-{step:06d}").glob("seed-*"))[0]
        rewards = {r["sample_id"]: r for r in tables.read_table(seed_dir / "rewards", "rewards").to_pylist()}
        renders = {r["sample_id"]: r for r in tables.read_table(seed_dir / "renders", "renders").to_pylist()
                   if r["view"] == 0}
        return rewards, renders

    (rew_a, img_a), (rew_b, img_b) = load(step_a), load(step_b)
    mean_a, mean_b = prompt_means(rew_a.values(), level), prompt_means(rew_b.values(), level)
    nan = float("nan")

    pids = sorted({r["prompt_id"] for r in rew_a.values()} & {r["prompt_id"] for r in rew_b.values()})
    ranked = sorted(pids, key=lambda p: -(mean_b.get(p, nan) - mean_a.get(p, nan)))
    k = n_prompts // 4
    mid = len(ranked) // 2
    shown = list(dict.fromkeys(ranked[:n_prompts - 2 * k] + ranked[mid - k // 2:mid - k // 2 + k] + ranked[-k:]))
    prompt = {rew_a[sid]["prompt_id"]: r.get("prompt") or "" for sid, r in img_a.items() if sid in rew_a}
    gap, row_h = 40, tile + 34
    sheet = Image.new("RGB", (2 * per_prompt * tile + gap, len(shown) * row_h + 30), "white")
    draw, label_font = ImageDraw.Draw(sheet), font(12)
    draw.text((5, 6), f"held-out, {level} level, view 0: left = step {step_a}, right = step {step_b}; "
              f"number = sample total", fill="black", font=label_font)
    for row, pid in enumerate(shown):
        y = 30 + row * row_h
        draw.text((5, y), f"{prompt.get(pid, pid)[:120]}   mean {mean_a.get(pid, nan):.2f} -> "
                  f"{mean_b.get(pid, nan):.2f}", fill="black", font=label_font)
        for col in range(2 * per_prompt):
            rewards, renders = (rew_a, img_a) if col < per_prompt else (rew_b, img_b)
            sid = f"{pid}-{col % per_prompt}-{level}"
            x = col * tile + (gap if col >= per_prompt else 0)
            if sid in renders and renders[sid]["status"] == "ok":
                sheet.paste(Image.open(renders[sid]["image_path"]).convert("RGB").resize((tile, tile)), (x, y + 14))
            total = rewards.get(sid, {}).get("total")
            label = "no sample" if sid not in rewards else "failed" if total is None else f"{total:.2f}"
            draw.text((x + 3, y + 16), label, fill="black", font=label_font)
    sheet.save(out)
    return shown


def plot_runs(out: Path, runs: dict[str, Path]) -> Path:
    """One image of four charts: training batch reward (fine), held-out reward per level, held-out
    fine CLIP score, and log10 KL to the initial policy; one line per run (and level)."""
    charts = {"train": {}, "heldout": {}, "clip": {}, "kl": {}}
    for label, d in runs.items():
        for name, made_by in (("metrics.parquet", "rl-step --run-metrics"),
                              ("heldout_rewards.json", f"rl3d learning-summary heldout {d}")):
            if not (Path(d) / name).is_file():
                raise InputError(f"{label}={d}: no {name} (written by {made_by})")
        m = read_run_metrics(Path(d) / "metrics.parquet")
        held = json.loads((Path(d) / "heldout_rewards.json").read_text())
        steps = [r["step"] for r in held]
        charts["train"][label] = m.get("reward_mean_fine", ([], []))
        for level, short in (("coarse", "R_high"), ("fine", "R_low")):
            charts["heldout"][f"{label} {short}"] = (steps, [r[f"total_{level}"] for r in held])
        charts["clip"][label] = (steps, [r["clip_score_fine"] for r in held])
        kl = [(x, float(np.log10(y))) for x, y in zip(*m.get("kl", ([], []))) if y > 0]  # a first step's KL is 0
        charts["kl"][label] = ([x for x, _ in kl], [y for _, y in kl])
    titles = {"train": "training batch R_low (fresh train prompts each step)",
              "heldout": "held-out reward (synth eval prompts, mean over seeds)",
              "clip": "held-out CLIP score, fine level", "kl": "log10 KL to the initial policy (k3)"}
    return line_sheet([(titles[k], charts[k]) for k in charts], out)


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
