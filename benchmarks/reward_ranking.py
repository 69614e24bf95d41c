"""Does the `default` reward rank the correct object above wrong ones? (synth eval split)

For N synth eval objects, four grids are scored against the object's OWN prompt and spec:
    correct    the ground-truth grid
    wrong_obj  the grid of another object of a different family (the next one in order)
    recolour   the object's most common colour replaced by a palette colour it does not use
    truncate   the top third of the occupied layers (y is up) removed
Each grid goes through the codec (as a policy's tokens would: the reward stage decodes
mesh_tokens), is written as a GLB, rendered by the render stage (4 views, 128 px) and scored by
the reward stage with the `default` preset at level `fine`.

Reported: pairwise accuracy, the fraction of objects whose correct grid scores strictly higher
than the variant, for the full total, for the non-spec part (total minus the weighted spec term:
CLIP + geometry; the honest test, since the spec checker also sees the ground-truth spec), for
CLIP alone and for the spec checker alone; and Spearman rank correlations over all 4N rows of the
non-spec total and of the CLIP score against the spec checker's raw score.

    python benchmarks/reward_ranking.py [--n 40] [--seed 4242] [--json out.json] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

KINDS = ("correct", "wrong_obj", "recolour", "truncate")


# ---- variants (pure functions of a grid) ------------------------------------------------------

def wrong_object_index(families: list[str], i: int) -> int:
    """The next object (cyclically) whose family differs from object i's."""
    n = len(families)
    for k in range(1, n):
        j = (i + k) % n
        if families[j] != families[i]:
            return j
    raise ValueError("all objects share one family: no wrong object to pick")


def recolour(grid: np.ndarray) -> np.ndarray:
    """Most common colour -> the palette colour 8 ids further on (cyclic), skipping colours the
    grid already uses, so the change is visible and does not merge two parts."""
    from rl3d.formats.voxels import NUM_COLORS

    counts = np.bincount(grid.ravel(), minlength=NUM_COLORS + 1)[1:]
    src = int(counts.argmax()) + 1
    used = set(np.flatnonzero(counts) + 1)
    for step in range(8, 8 + NUM_COLORS):
        dst = (src - 1 + step) % NUM_COLORS + 1
        if dst not in used:
            break
    else:  # every colour in use: any other colour
        dst = src % NUM_COLORS + 1
    out = grid.copy()
    out[grid == src] = dst
    return out


def truncate_top(grid: np.ndarray, fraction: float = 1 / 3) -> np.ndarray:
    """Remove the top `fraction` of the occupied y layers (at least one, never all)."""
    layers = np.flatnonzero(grid.any(axis=(0, 2)))
    drop = min(len(layers) - 1, max(1, round(len(layers) * fraction)))
    out = grid.copy()
    if drop > 0:
        out[:, layers[len(layers) - drop]:, :] = 0
    return out


def make_variants(objs) -> list[dict]:
    """One row per (object, kind): the grid to score and the object whose prompt/spec it is scored against."""
    fams = [o.family for o in objs]
    rows = []
    for i, o in enumerate(objs):
        grids = {"correct": o.grid, "wrong_obj": objs[wrong_object_index(fams, i)].grid,
                 "recolour": recolour(o.grid), "truncate": truncate_top(o.grid)}
        for k, kind in enumerate(KINDS):
            rows.append(dict(sample_id=f"{o.sample_id}-{kind}", prompt_id=o.sample_id, sample_index=k, kind=kind,
                             prompt=o.caption, spec=json.dumps(o.spec, sort_keys=True), grid=grids[kind]))
    return rows


# ---- the pipeline: samples table -> render stage -> reward stage ------------------------------

def write_samples(rows: list[dict], work: Path) -> Path:
    """A gen-like samples table (level fine) with codec tokens, GLBs of the decoded grids and a spec column."""
    from rl3d.formats import tables
    from rl3d.formats.codec import VoxelCodec
    from rl3d.formats.glb import write_glb
    from rl3d.formats.voxels import grid_to_mesh

    codec = VoxelCodec.load()
    toks = codec.encode_batch(np.stack([r["grid"] for r in rows]))
    decoded = codec.decode_batch(toks)  # what the reward stage will see; render the same grid
    (work / "meshes").mkdir(parents=True, exist_ok=True)
    paths = []
    for r, g in zip(rows, decoded):
        p = work / "meshes" / f"{r['sample_id']}.glb"
        write_glb(grid_to_mesh(g), p)
        paths.append(str(p))
    n = len(rows)
    cols = {k: [r[k] for r in rows] for k in ("sample_id", "prompt_id", "sample_index", "prompt")}
    cols.update({"level": ["fine"] * n, "mesh_tokens": [list(map(int, t)) for t in toks], "status": ["ok"] * n,
                 "message": [""] * n, "mesh_path": paths, "input_ids": [[0]] * n, "prompt_len": [0] * n,
                 "reasoning_start": [0] * n, "reasoning_end": [0] * n, "mesh_start": [0] * n, "mesh_end": [0] * n,
                 "logprobs": [[0.0]] * n, "reasoning": [""] * n, "policy_id": ["reward_ranking"] * n,
                 "policy_step": [0] * n, "seed": [0] * n})
    types = dict(tables.SCHEMAS["samples"][1])
    arrays = {k: pa.array(v, types[k]) for k, v in cols.items()}
    arrays["spec"] = pa.array([r["spec"] for r in rows], pa.string())
    pq.write_table(pa.table(arrays), work / "samples.parquet")
    return work / "samples.parquet"


def score(samples: Path, work: Path, views: int, resolution: int) -> tuple[list[dict], dict]:
    from rl3d.formats import tables
    from rl3d.stages import reward
    from rl3d.stages.contract import StageOptions
    from rl3d.stages.render import run_render

    t0 = time.perf_counter()
    run_render(samples, StageOptions(out=work / "renders", quiet=True), views=views, resolution=resolution,
               sheet=False, workers=1)
    t1 = time.perf_counter()
    reward.run(samples, work / "renders", "default", StageOptions(out=work / "rewards", quiet=True))
    t2 = time.perf_counter()
    return tables.read_table(work / "rewards", "rewards").to_pylist(), {"render_s": t1 - t0, "reward_s": t2 - t1}


# ---- metrics ----------------------------------------------------------------------------------

def signals(r: dict) -> dict:
    """The scores compared: full total, non-spec part, CLIP alone, spec checker alone."""
    return {"total": r["total"], "non_spec": r["total"] - (r["spec"] or 0.0),
            "clip": r["clip_score_raw"], "spec": r["spec_raw"]}


def pairwise_accuracy(by_obj: dict[str, dict[str, dict]], kind: str, signal: str) -> tuple[float, int]:
    """Fraction of objects with correct > variant (strict), and the number of ties."""
    wins = ties = 0
    for v in by_obj.values():
        a, b = v["correct"][signal], v[kind][signal]
        wins += a > b
        ties += a == b
    return wins / len(by_obj), ties


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--json", default="", help="also write the numbers here")
    ap.add_argument("--keep", default="", help="work in this dir and keep it (GLBs, renders, rewards) for audit")
    args = ap.parse_args()
    import torch
    from scipy.stats import spearmanr

    from rl3d.stages.shapes.world import generate_objects

    torch.set_num_threads(1)  # a shared 2-core box
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads 1")
    objs = generate_objects(args.n, seed=args.seed, split="eval")
    rows = make_variants(objs)
    kind_of = {r["sample_id"]: r["kind"] for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        samples = write_samples(rows, work)
        out, secs = score(samples, work, args.views, args.resolution)
    bad = [r for r in out if r["status"] != "ok"]
    if bad:
        print(f"{len(bad)} rows not ok, dropped with their object: " +
              "; ".join(f"{r['sample_id']}: {r['status']} {r['message']}" for r in bad[:5]))
    drop = {r["prompt_id"] for r in bad}
    by_obj: dict[str, dict[str, dict]] = {}
    for r in out:
        if r["prompt_id"] not in drop:
            by_obj.setdefault(r["prompt_id"], {})[kind_of[r["sample_id"]]] = signals(r)
    n = len(by_obj)
    print(f"N={n} synth eval objects (seed {args.seed}), {len(KINDS)} grids each, default preset level fine, "
          f"{args.views} views @ {args.resolution}px; render {secs['render_s']:.1f}s, reward {secs['reward_s']:.1f}s")

    sigs = ("total", "non_spec", "clip", "spec")
    result = {"n": n, "seed": args.seed, "views": args.views, "resolution": args.resolution, **secs,
              "pairwise": {}, "mean": {}, "spearman": {}}
    print("\nmean score per grid kind")
    print(f"{'kind':10s} " + " ".join(f"{s:>9s}" for s in sigs))
    for kind in KINDS:
        m = {s: float(np.mean([v[kind][s] for v in by_obj.values()])) for s in sigs}
        result["mean"][kind] = m
        print(f"{kind:10s} " + " ".join(f"{m[s]:9.3f}" for s in sigs))
    print("\npairwise accuracy: fraction of objects with score(correct) > score(variant) [ties]")
    print(f"{'variant':10s} " + " ".join(f"{s:>13s}" for s in sigs))
    for kind in KINDS[1:]:
        acc = {s: pairwise_accuracy(by_obj, kind, s) for s in sigs}
        result["pairwise"][kind] = {s: {"accuracy": a, "ties": t} for s, (a, t) in acc.items()}
        print(f"{kind:10s} " + " ".join(f"{a:9.3f} [{t:2d}]" for a, t in acc.values()))
    flat = [v[k] for v in by_obj.values() for k in KINDS]
    spec = [f["spec"] for f in flat]
    print(f"\nSpearman rank correlation with the spec checker's raw score, over all {len(flat)} grids")
    for s in ("non_spec", "clip"):
        rho, p = spearmanr([f[s] for f in flat], spec)
        result["spearman"][s] = {"rho": float(rho), "p": float(p)}
        print(f"  {s:9s} rho {rho:6.3f}  (p {p:.1e})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
