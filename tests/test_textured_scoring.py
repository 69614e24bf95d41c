"""Samples with a textured mesh (gen --texture-hook: textured_path) are rendered and scored on it,
and the renders and rewards tables say which mesh each row shows (mesh_source)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trimesh

from rl3d.formats import tables
from rl3d.formats.codec import VoxelCodec
from rl3d.formats.glb import write_glb
from rl3d.formats.tables import read_table
from rl3d.stages import render, reward
from rl3d.stages.contract import StageOptions
from rl3d.stages.rewards.base import TermResult


def box(rgb):
    m = trimesh.creation.box(extents=(0.5, 0.5, 0.5))
    m.visual = trimesh.visual.ColorVisuals(m, face_colors=np.tile([*rgb, 255], (len(m.faces), 1)).astype(np.uint8))
    return m


@pytest.fixture
def gen_dir(tmp_path):
    """A gen output: three blue coarse meshes, red textured GLBs for two (one of them broken)."""
    out = tmp_path / "gen"
    (out / "meshes").mkdir(parents=True)
    (out / "_textured").mkdir()
    codec = VoxelCodec.load()
    grid = np.zeros((32, 32, 32), np.uint8)
    grid[8:24, 0:16, 8:24] = 1
    rows = []
    for i in range(3):
        sid = f"p{i}-0-fine"
        write_glb(box((30, 30, 200)), out / "meshes" / f"{sid}.glb")
        textured = None
        if i == 0:
            write_glb(box((200, 30, 30)), out / "_textured" / f"{sid}.glb")
            textured = f"_textured/{sid}.glb"
        elif i == 1:
            (out / "_textured" / f"{sid}.glb").write_bytes(b"glTF\x02\x00\x00\x00garbage")
            textured = f"_textured/{sid}.glb"
        rows.append(dict(sample_id=sid, prompt_id=f"p{i}", sample_index=0, level="fine", prompt="a red box",
                         input_ids=[0], prompt_len=0, reasoning_start=0, reasoning_end=0, mesh_start=0, mesh_end=0,
                         logprobs=[0.0], reasoning="", mesh_tokens=codec.encode(grid).tolist(), status="ok",
                         message="", mesh_path=f"meshes/{sid}.glb", policy_id="t", policy_step=0, seed=0,
                         textured_path=textured))
    types = dict(tables.SCHEMAS["samples"][1], textured_path=pa.string())
    pq.write_table(pa.table({k: pa.array([r[k] for r in rows], t) for k, t in types.items()}), out / "part-0.parquet")
    return out


def render_to(gen_dir, out):
    render.run_render(gen_dir, StageOptions(out=out, quiet=True), views=2, resolution=32, supersample=1, sheet=False)
    return read_table(out, "renders").to_pylist()


def centre_rgb(row):
    from PIL import Image

    return np.asarray(Image.open(row["image_path"]))[16, 16].astype(int)


def test_render_uses_the_textured_mesh_and_records_it(gen_dir, tmp_path):
    rows = render_to(gen_dir, tmp_path / "renders")
    by = {r["sample_id"]: [x for x in rows if x["sample_id"] == r["sample_id"]] for r in rows}
    textured, broken, plain = by["p0-0-fine"], by["p1-0-fine"], by["p2-0-fine"]
    assert all(r["mesh_source"] == "textured" and r["status"] == "ok" for r in textured)
    assert all(r["mesh_source"] == "mesh" and r["status"] == "ok" for r in plain)
    r, g, b = centre_rgb(textured[0])
    assert r > 2 * b                                   # the red textured box, not the blue coarse one
    r, g, b = centre_rgb(plain[0])
    assert b > 2 * r
    # a textured GLB that does not read fails the sample (never silently the coarse mesh)
    assert all(x["status"] == "render_error" and "_textured" in x["message"] and x["mesh_source"] == "textured"
               for x in broken)


def test_default_renders_table_has_no_mesh_source(tmp_path):
    d = tmp_path / "glbs"
    d.mkdir()
    write_glb(box((30, 30, 200)), d / "a.glb")
    render.run_render(d, StageOptions(out=tmp_path / "r", quiet=True), views=1, resolution=16, sheet=False)
    assert "mesh_source" not in read_table(tmp_path / "r", "renders").column_names


class Recorder:
    """A mesh term that records the mesh path it was given."""
    needs_views = False
    seen: dict = {}

    def score(self, items):
        Recorder.seen.update({it.sample_id: it.mesh_path for it in items})
        return [TermResult(value=1.0) for _ in items]


def test_reward_scores_the_textured_mesh_and_flags_stale_renders(gen_dir, tmp_path, monkeypatch):
    config = tmp_path / "cfg.toml"
    config.write_text('name = "t"\n[[levels.fine]]\nname = "clip_score"\nbackend = "clip"\naggregate = "max"\n'
                      '[[levels.fine]]\nname = "watertight"\nbackend = "geometry"\naggregate = "none"\n')
    real_backend = reward.get_backend
    monkeypatch.setattr(reward, "get_backend", lambda t: Recorder() if t.name == "watertight" else real_backend(t))
    fresh = render_to(gen_dir, tmp_path / "renders")
    # gen_dir is made here without rl3d provenance: the join needs allow_unverified
    reward.run(gen_dir, tmp_path / "renders", str(config), StageOptions(out=tmp_path / "rw", quiet=True),
               allow_unverified=True)
    t = {r["sample_id"]: r for r in read_table(tmp_path / "rw", "rewards").to_pylist()}
    assert [t[s]["mesh_source"] for s in sorted(t)] == ["textured", "textured", "mesh"]
    assert t["p0-0-fine"]["clip_score_status"] == "ok" and t["p2-0-fine"]["clip_score_status"] == "ok"
    assert t["p1-0-fine"]["clip_score_status"] == "render_error"
    assert Recorder.seen["p0-0-fine"].endswith("_textured/p0-0-fine.glb")
    assert Recorder.seen["p2-0-fine"].endswith("meshes/p2-0-fine.glb")
    # renders of the coarse meshes (made before the texture hook ran) are stale for textured samples
    stale = [dict(r, mesh_source="mesh") for r in fresh]
    rt = tables.SCHEMAS["renders"][1]
    pq.write_table(pa.table({**{k: pa.array([r[k] for r in stale], rt[k]) for k in rt},
                             "mesh_source": pa.array([r["mesh_source"] for r in stale])}), tmp_path / "stale.parquet")
    reward.run(gen_dir, tmp_path / "stale.parquet", str(config), StageOptions(out=tmp_path / "rw2", quiet=True),
               allow_unverified=True)
    t = {r["sample_id"]: r for r in read_table(tmp_path / "rw2", "rewards").to_pylist()}
    assert t["p0-0-fine"]["clip_score_status"] == "stale_renders" and "render the samples again" in \
        t["p0-0-fine"]["clip_score_message"]
    assert t["p2-0-fine"]["clip_score_status"] == "ok"
