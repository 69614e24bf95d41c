"""Model-free reward terms (geometry, spec) scored in worker processes give the same table."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from rl3d.formats import tables
from rl3d.formats.codec import VoxelCodec
from rl3d.formats.voxels import coarsen_grid
from rl3d.stages import reward
from rl3d.stages.contract import StageOptions
from rl3d.stages.shapes.world import generate_objects


def test_host_terms_in_worker_processes_give_the_same_rewards(tmp_path, monkeypatch):
    codec = VoxelCodec.load()
    rows = []
    for k, o in enumerate(generate_objects(6, seed=4)):
        for lvl, g in (("coarse", coarsen_grid(o.grid)), ("fine", o.grid)):
            rows.append(dict(sample_id=f"p{k}-0-{lvl}", prompt_id=f"p{k}", sample_index=0, level=lvl, prompt=o.caption,
                             input_ids=[0], prompt_len=0, reasoning_start=0, reasoning_end=0, mesh_start=0, mesh_end=0,
                             logprobs=[0.0], reasoning="", mesh_tokens=codec.encode(g).tolist(), status="ok",
                             message="", mesh_path="", policy_id="t", policy_step=0, seed=0,
                             spec=json.dumps(o.spec, sort_keys=True)))
    types = dict(tables.SCHEMAS["samples"][1], spec=pa.string())
    pq.write_table(pa.table({k: pa.array([r[k] for r in rows], t) for k, t in types.items()}), tmp_path / "s.parquet")
    text = open(reward.load_config("default").source).read()
    blocks = [b for b in text.split("[[levels.") if 'backend = "clip"' not in b]  # model-free terms only
    (tmp_path / "cfg.toml").write_text("[[levels.".join(blocks))
    reward.run(tmp_path / "s.parquet", None, str(tmp_path / "cfg.toml"), StageOptions(out=tmp_path / "here", quiet=True))
    monkeypatch.setattr(reward, "MIN_ITEMS_FOR_PROCESSES", 1)
    monkeypatch.setattr(reward, "usable_cores", lambda: 3)  # two worker processes
    reward.run(tmp_path / "s.parquet", None, str(tmp_path / "cfg.toml"), StageOptions(out=tmp_path / "pool", quiet=True))
    a, b = tables.read_table(tmp_path / "here", "rewards"), tables.read_table(tmp_path / "pool", "rewards")
    assert a.equals(b) and a.num_rows == 12 and set(a.column("status").to_pylist()) <= {"ok", "partial"}
