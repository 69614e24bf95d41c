"""`rl3d synth`: the procedural shape world (stages/shapes/world.py) written as an objects table:
per object its caption, plan, detail, spec, mesh tokens and a GLB. Any subset (a shard) reproduces
exactly the rows of the full run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from rl3d.formats import shards as shards_io
from rl3d.formats import voxels as vox
from rl3d.formats.codec import VoxelCodec
from rl3d.formats.errors import InputError
from rl3d.formats.glb import write_glb
from rl3d.formats.tables import SCHEMAS
from rl3d.stages.contract import Job, StageOptions, status_counts, timed
from rl3d.stages.shapes.world import SPLITS, SynthObject, make_object, object_id

def _encode(grids: np.ndarray) -> tuple[list[list[int]], str]:
    """Mesh tokens with the shipped codec, or empty lists + "no codec" while none is available."""
    try:
        codec = VoxelCodec.load()
    except (ImportError, FileNotFoundError):
        return [[] for _ in range(len(grids))], "no codec"
    if not len(grids):
        return [], ""
    return [list(map(int, t)) for t in codec.encode_batch(grids)], ""


def objects_table(objs: list[SynthObject], tokens: list[list[int]], mesh_paths: list[str],
                  statuses: list[str], messages: list[str]) -> pa.Table:
    _, cols = SCHEMAS["objects"]
    data = {
        "sample_id": [o.sample_id for o in objs], "prompt_id": [o.sample_id for o in objs],
        "prompt": [o.caption for o in objs], "category": [o.category for o in objs],
        "family": [o.family for o in objs], "split": [o.split for o in objs],
        "spec": [json.dumps(o.spec, sort_keys=True) for o in objs], "plan": [o.plan for o in objs],
        "detail": [o.detail for o in objs], "voxels": [vox.to_bytes(o.grid) for o in objs],
        "mesh_tokens": tokens, "mesh_path": mesh_paths, "status": statuses, "message": messages,
    }
    return pa.table({k: pa.array(v, cols[k]) for k, v in data.items()})


class SynthJob(Job):
    """`n` procedural shape-world objects of a split: captions, plans, specs, tokens and GLBs."""

    stage, kind = "synth", "objects"

    def __init__(self, n: int, seed: int, split: str, meshes: bool = True):
        if split not in SPLITS:
            raise InputError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
        if n < 0:
            raise InputError(f"--n {n}: must be >= 0")
        self.n, self.seed, self.split, self.meshes = n, seed, split, meshes
        self.out = Path(".")

    def config(self) -> dict:
        return {"stage": "synth", "n": self.n, "seed": self.seed, "split": self.split, "meshes": self.meshes}

    def run(self, opts: StageOptions) -> dict:
        self.out = Path(opts.out)
        return super().run(opts)

    def produce(self, shard, progress):
        n, seed, split, out = self.n, self.seed, self.split, self.out
        stats: dict = {}
        ids = [i for i in range(n) if shard.owns(object_id(i, seed))]
        with timed(stats, "generate_s"):
            objs = [make_object(i, seed, split) for i in progress.track(ids, len(ids), "synth objects")]
        with timed(stats, "encode_s"):
            tokens, codec_msg = _encode(np.stack([o.grid for o in objs]) if objs else np.zeros((0, 32, 32, 32), np.uint8))
        statuses, messages, paths = ["ok"] * len(objs), [codec_msg] * len(objs), [""] * len(objs)
        if self.meshes:
            with timed(stats, "glb_s"):
                for k, o in enumerate(progress.track(objs, len(objs), "synth meshes")):
                    rel = f"{shards_io.MESHES}/{o.sample_id}.glb"
                    try:
                        write_glb(vox.grid_to_mesh(o.grid), shards_io.inside(out, rel))
                        paths[k] = rel
                    except Exception as e:  # keep the row, say why it has no mesh
                        if shards_io.disk_error(e):  # a full disk is no property of the object: fail the shard
                            raise
                        statuses[k], messages[k] = "mesh_error", f"{type(e).__name__}: {e}"
        table = objects_table(objs, tokens, paths, statuses, messages)
        stats["splits"] = {s: sum(o.split == s for o in objs) for s in ("train", "eval")}
        stats["status"] = status_counts(table)
        return table, stats


def run_synth(n: int, seed: int, split: str, opts: StageOptions, meshes: bool = True) -> dict:
    return SynthJob(n, seed, split, meshes).run(opts)
