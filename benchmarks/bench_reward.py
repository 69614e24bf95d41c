"""Reward stage throughput (items/s): the `default` preset on 128 meshes x 6 views (64 prompts x
coarse + fine), each variant against a baseline measured in the same run.

Variants: the stage as shipped (backends called on batches of 64 samples; CLIP views decoded and
preprocessed in background threads, encoded 64 per forward pass on the scorer's device, cuda when
available) against an unbatched baseline (one sample per backend call, one view per forward
pass). Render time is setup, not measured. Goals: <= 30 s batched on a 2-core CPU at 128 px; on
one H100/H200 at 512 px, reward must stay off the critical path of a Hi-GRPO iteration
(benchmarks/bench_iteration.sh).

    python benchmarks/bench_reward.py [--meshes 128] [--views 6] [--resolution 512 on cuda, 128 on cpu]
    python benchmarks/bench_reward.py --meshes 16 --resolution 64     # a small CPU check
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


def make_inputs(work: Path, meshes: int, views: int, resolution: int) -> tuple[Path, Path]:
    """Synth objects -> samples table (coarse + fine rows, codec tokens) + rendered views."""
    from PIL import Image

    from rl3d.formats import tables
    from rl3d.formats.codec import VoxelCodec
    from rl3d.formats.voxels import coarsen_grid, grid_to_mesh
    from rl3d.stages.raycast.cameras import view_angles
    from rl3d.stages.raycast.renderer import render_views
    from rl3d.stages.shapes.world import generate_objects

    objs = generate_objects(meshes // 2, seed=0)
    codec = VoxelCodec.load()
    az, el = view_angles(views)
    rows, ren = [], []
    for k, o in enumerate(objs):
        grid = o.grid
        for lvl, g in (("coarse", coarsen_grid(grid)), ("fine", grid)):
            sid = f"p{k}-0-{lvl}"
            rows.append(dict(sample_id=sid, prompt_id=f"p{k}", sample_index=0, level=lvl, prompt=o.caption,
                             mesh_tokens=codec.encode(g).tolist(), status="ok", message="",
                             spec=json.dumps(o.spec, sort_keys=True)))
            decoded = codec.decode(codec.encode(g))
            if not decoded.any():  # nothing to render: the row gets missing_renders, as in a real run
                continue
            rgb = render_views(grid_to_mesh(decoded), az, el, resolution=resolution, with_normals=False)["rgb"]
            for v in range(views):
                p = work / "images" / f"{sid}-{v}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rgb[v]).save(p)
                ren.append(dict(sample_id=sid, view=v, azimuth=float(az[v]), elevation=float(el[v]),
                                image_path=str(p), status="ok", message=""))
    n = len(rows)
    types = dict(tables.SCHEMAS["samples"][1])
    cols = {k: [r[k] for r in rows] for k in ("sample_id", "prompt_id", "sample_index", "level", "prompt",
                                              "mesh_tokens", "status", "message")}
    cols.update({"input_ids": [[0]] * n, "prompt_len": [0] * n, "reasoning_start": [0] * n, "reasoning_end": [0] * n,
                 "mesh_start": [0] * n, "mesh_end": [0] * n, "logprobs": [[0.0]] * n, "reasoning": [""] * n,
                 "mesh_path": [""] * n, "policy_id": ["bench"] * n, "policy_step": [0] * n, "seed": [0] * n})
    arrays = {k: pa.array(v, types[k]) for k, v in cols.items()}
    if any(r["spec"] for r in rows):
        arrays["spec"] = pa.array([r["spec"] for r in rows], pa.string())
    pq.write_table(pa.table(arrays), work / "samples.parquet")
    rt = dict(tables.SCHEMAS["renders"][1])
    pq.write_table(pa.table({k: pa.array([r[k] for r in ren], rt[k]) for k in rt}), work / "renders.parquet")
    return work / "samples.parquet", work / "renders.parquet"


def unbatched_config(src: str, dst: Path) -> Path:
    """The same preset with the CLIP backend encoding one view per forward pass."""
    text = Path(src).read_text().replace('options = { metric = "clip_score" }',
                                         'options = { metric = "clip_score", batch_size = 1 }')
    dst.write_text(text)
    return dst


def run_once(samples, renders, config, out: Path, batch: int) -> tuple[float, dict]:
    from rl3d.stages import reward
    from rl3d.stages.contract import StageOptions
    from rl3d.stages.scoring import clip_scorer as clip

    reward._BACKEND_CACHE.clear()  # fresh backends and embedding caches: cold start each run
    clip._SCORERS.clear()
    t0 = time.perf_counter()
    summary = reward.run(samples, renders, str(config), StageOptions(out=out, quiet=True, overwrite=True), batch=batch)
    return time.perf_counter() - t0, summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meshes", type=int, default=128)
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--resolution", type=int, default=None, help="[512 on cuda, 128 on cpu]")
    ap.add_argument("--config", default="default")
    args = ap.parse_args()
    import torch

    from rl3d.stages.rewards.reward_config import load_config

    args.resolution = args.resolution or (512 if torch.cuda.is_available() else 128)
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}, cuda {card}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        samples, renders = make_inputs(work, args.meshes, args.views, args.resolution)
        print(f"setup (synth + render {args.meshes} meshes x {args.views} views @ {args.resolution}px): "
              f"{time.perf_counter() - t0:.1f}s")
        cfg = load_config(args.config)
        base_cfg = unbatched_config(cfg.source, work / "unbatched.toml")
        run_once(samples, renders, args.config, work / "warm", 64)  # warm-up: imports, model load
        results = {}
        for name, config, batch in (("unbatched (baseline)", base_cfg, 1), ("batched (shipped)", args.config, 64)):
            secs, summary = run_once(samples, renders, config, work / name.split()[0], batch)
            parts = {k[len("seconds_"):]: v for k, v in summary.items() if k.startswith("seconds_")}
            results[name] = (secs, parts, summary.get("status"))
        base = results["unbatched (baseline)"][0]
        views = args.meshes * args.views
        print(f"\n{'variant':22s} {'seconds':>8s} {'items/s':>8s} {'views/s':>8s} {'vs baseline':>12s}")
        for name, (secs, _, _) in results.items():
            print(f"{name:22s} {secs:8.2f} {args.meshes / secs:8.1f} {views / secs:8.1f} {base / secs:11.2f}x")
        for name, (secs, parts, status) in results.items():
            print(f"\n{name}: status {status}; seconds per term")
            for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
                print(f"    {k:32s} {v:7.3f}s")
        print(f"\n{args.meshes} meshes x {args.views} views at {args.resolution} px (items = samples)")

if __name__ == "__main__":
    main()
