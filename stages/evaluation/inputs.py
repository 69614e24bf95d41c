"""What eval reads and prepares around the gen and render stages: readable policy names, each
policy's mode, the benchmark's prompt file, the reference views for KD/FD (the user's, the
benchmark's, or the ground-truth meshes to render), and a policy's final-level samples as Samples."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rl3d.formats import shards as shards_io
from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.formats.glb import write_glb
from rl3d.formats.voxels import grid_to_mesh
from rl3d.stages.contract import Progress
from rl3d.stages.eval_sets import Benchmark, reference_images
from rl3d.stages.evaluation.measures import Sample
from rl3d.stages.policy.checkpoint import load_codec_for, read_policy_meta


def policy_names(dirs: list[str]) -> list[str]:
    """Readable unique names: the dir's base name, disambiguated by its parent when names clash."""
    base = [Path(d).resolve().name for d in dirs]
    names = []
    for i, d in enumerate(dirs):
        n = base[i] if base.count(base[i]) == 1 else f"{Path(d).resolve().parent.name}-{base[i]}"
        while n in names:
            n += f"-{i}"
        names.append(n)
    return names


def resolve_mode(policy_dir: Path, mode: str) -> str:
    """auto: the policy's own rl3d_policy.json `mode` when it says "flat"/"hi-grpo", else hi-grpo."""
    if mode in ("hi-grpo", "flat"):
        return mode
    if mode != "auto":
        raise InputError(f"--mode {mode!r}: expected auto, hi-grpo or flat")
    meta = read_policy_meta(policy_dir)
    return meta.get("mode") if meta.get("mode") in ("hi-grpo", "flat") else "hi-grpo"


def write_prompts(bench: Benchmark, out: Path) -> Path:
    """The exact prompt list, named by its content hash (a changed list never reuses old gen output)."""
    p = out / f"prompts-{bench.content_hash()}.jsonl"
    if not p.exists():
        keep = ("prompt_id", "prompt", "category", "spec", "family")
        shards_io.atomic_write_bytes(p, "".join(json.dumps({k: r[k] for k in keep if r.get(k) is not None}) + "\n"
                                                for r in bench.prompts).encode())
    return p


def views_by_sample(renders_dir: Path) -> dict[str, list[str]]:
    t = tables.read_table(renders_dir, "renders").to_pylist()
    views: dict[str, list[tuple[int, str]]] = {}
    for r in t:
        if r["status"] == "ok" and r["image_path"]:
            views.setdefault(r["sample_id"], []).append((r["view"], r["image_path"]))
    return {k: [p for _, p in sorted(v)] for k, v in views.items()}


def given_references(bench: Benchmark, references: str | None) -> tuple[dict[str, list[str]], str] | None:
    """prompt_id -> reference view paths and where they came from: --references, else the benchmark's
    reference_dir column; None when neither gives any (the ground truth may then be rendered)."""
    if references:
        return references_from(Path(references), bench), str(references)
    rows = [r for r in bench.prompts if r.get("reference_dir")]
    if rows:
        return {r["prompt_id"]: reference_images(r["reference_dir"]) for r in rows}, "the benchmark's reference_dir column"
    return None


def reference_objects(bench: Benchmark, ref: Path, progress: Progress) -> Path:
    """The benchmark's ground-truth grids as GLBs under `ref` and an objects table of them (once per
    prompt list), for the same renderer and cameras as the generated samples."""
    index = ref / f"objects-{bench.content_hash()}.parquet"
    if not index.exists():
        progress.log(f"eval: building {len(bench.prompts)} reference meshes from the benchmark's specs")
        rows = []
        for r in bench.prompts:
            rel = f"{shards_io.MESHES}/{r['prompt_id']}.glb"
            if not (ref / rel).exists():
                write_glb(grid_to_mesh(bench.reference_grid(r)), shards_io.inside(ref, rel))
            rows.append({"sample_id": r["prompt_id"], "prompt_id": r["prompt_id"], "mesh_path": rel,
                         "status": "ok", "message": "", "prompt": r["prompt"]})
        with shards_io.atomic_path(index) as tmp:
            pq.write_table(pa.Table.from_pylist(rows), tmp)
    return index


def references_from(d: Path, bench: Benchmark) -> dict[str, list[str]]:
    """--references: a renders table dir (from `rl3d render`, keyed by prompt_id or sample_id) or a
    folder with one sub-folder of images per prompt_id."""
    if not d.is_dir():
        raise InputError(f"--references {d}: not a directory")
    if any(d.glob("*.parquet")):
        t = tables.read_table(d, "renders")
        key = "prompt_id" if "prompt_id" in t.column_names else "sample_id"
        out: dict[str, list[str]] = {}
        for r in t.to_pylist():
            if r["status"] == "ok" and r["image_path"]:
                out.setdefault(r[key], []).append(r["image_path"])
    else:
        out = {sub.name: reference_images(sub) for sub in sorted(d.iterdir()) if sub.is_dir()}
    wanted = {r["prompt_id"] for r in bench.prompts}
    out = {k: v for k, v in out.items() if k in wanted and v}
    if not out:
        raise InputError(f"--references {d}: no reference images for any prompt_id of the benchmark")
    return out


def final_level_samples(rows: list[dict], bench: Benchmark, policy_dir: Path, views: dict[str, list[str]]) -> list[Sample]:
    """A policy's final-level samples rows as Samples: tokens decoded with the policy's codec (a failure
    is the row's decode_error), its rendered views, the benchmark's category and spec."""
    codec = load_codec_for(Path(policy_dir), read_policy_meta(policy_dir))
    prompt_rows = {r["prompt_id"]: r for r in bench.prompts}
    out = []
    for r in rows:
        grid, status, message = None, r["status"], r["message"] or ""
        if status == "ok":
            try:
                grid = codec.decode(np.asarray(r["mesh_tokens"], np.int64))
            except ValueError as e:
                status, message = "decode_error", str(e)
        pr = prompt_rows.get(r["prompt_id"], {})
        out.append(Sample(r["sample_id"], r["prompt_id"], pr.get("category") or "uncategorized", r["prompt"],
                          status, message, grid, views.get(r["sample_id"], []),
                          json.loads(pr["spec"]) if pr.get("spec") else None))
    return out
