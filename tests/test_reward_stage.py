"""The reward stage end to end: hand-made samples + renders tables through `rl3d reward`."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import samples_table

from rl3d.cli.main import main
from rl3d.formats import tables
from rl3d.formats.codec import VoxelCodec
from rl3d.formats.voxels import to_bytes

CONFIG = """
name = "test"
[[levels.coarse]]
name = "clip_score"
backend = "clip"
scale = 0.01
aggregate = "max"
options = {{ model = "{model}" }}
[[levels.coarse]]
name = "stability"
backend = "geometry"
weight = 0.5
aggregate = "none"
[[levels.fine]]
name = "clip_score"
backend = "clip"
scale = 0.01
aggregate = "mean"
options = {{ model = "{model}" }}
[[levels.fine]]
name = "symmetry"
backend = "geometry"
aggregate = "none"
required = false
[[levels.single]]
name = "floating_parts"
backend = "geometry"
aggregate = "none"
"""


def grid_cube(y0=0):
    g = np.zeros((32, 32, 32), np.uint8)
    g[8:16, y0:y0 + 8, 8:16] = 3
    return g


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rl3d.stages.train_scorer import init_scorer, save_scorer

    d = tmp_path_factory.mktemp("reward")
    model, tok, proc = init_scorer(["a red cube", "a blue cube on the ground"], seed=0, hidden=32, layers=1,
                                   heads=2, image_size=32, patch=8, projection=16)
    save_scorer(d / "model", model, tok, proc, {})
    (d / "cfg.toml").write_text(CONFIG.format(model=d / "model"))
    codec = VoxelCodec.load()
    toks = codec.encode(grid_cube()).tolist()
    floating = grid_cube(10)
    rows = []
    for pid in ("p0", "p1", "p2"):
        for i in range(2):
            for lvl in ("coarse", "fine"):
                rows.append(dict(sample_id=f"{pid}-{i}-{lvl}", prompt_id=pid, sample_index=i, level=lvl,
                                 prompt=f"a red cube {pid}", mesh_tokens=toks, status="ok", message=""))
    rows[1]["mesh_tokens"] = codec.encode(floating).tolist()        # p0-0-fine: hovering cube
    rows[2]["mesh_tokens"] = toks[:100]                              # p0-1-coarse: truncated tokens
    rows[3].update(status="gen_error", message="ran out of budget")  # p0-1-fine
    pq.write_table(samples_table(rows), d / "samples.parquet")
    rng = np.random.default_rng(0)
    (d / "images").mkdir()
    ren = []
    for r in rows:
        if r["sample_id"] == "p1-0-coarse":
            continue  # no renders for this one
        for v in range(3):
            p = d / "images" / f"{r['sample_id']}-{v}.png"
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(p)
            ren.append(dict(sample_id=r["sample_id"], view=v, azimuth=120.0 * v, elevation=20.0,
                            image_path=f"images/{p.name}", status="ok", message=""))
    (d / "images" / "p1-1-fine-1.png").write_bytes(b"not a png")  # a corrupt view -> clip backend fails
    types = dict(tables.SCHEMAS["renders"][1])
    pq.write_table(pa.table({k: pa.array([x[k] for x in ren], types[k]) for k in types}), d / "renders.parquet")
    return d


def run_cli(args):
    # the tables of `setup` are made here, without rl3d provenance: joining them needs --allow-unverified
    return CliRunner().invoke(main, ["reward", *map(str, args), "--allow-unverified"], catch_exceptions=False)


def test_end_to_end_statuses_totals_and_schema(setup, tmp_path):
    d = setup
    res = run_cli(["--samples", d / "samples.parquet", "--renders", d / "renders.parquet", "--config",
                   d / "cfg.toml", "--out", tmp_path / "r", "--json", "--quiet", "--batch", "3"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    t = tables.read_table(tmp_path / "r", "rewards")
    for c in ("clip_score", "clip_score_raw", "clip_score_views", "clip_score_status", "stability", "symmetry_status",
              "floating_parts"):
        assert c in t.column_names
    rows = {r["sample_id"]: r for r in t.to_pylist()}
    assert len(rows) == 12 and summary["rows"] == 12
    ok = rows["p2-0-coarse"]
    assert ok["status"] == "ok"
    assert ok["clip_score_raw"] == pytest.approx(max(ok["clip_score_views"])) and len(ok["clip_score_views"]) == 3
    assert ok["total"] == pytest.approx(0.01 * ok["clip_score_raw"] + 0.5 * 1.0)
    fine = rows["p2-0-fine"]
    assert fine["clip_score_raw"] == pytest.approx(np.mean(fine["clip_score_views"]))
    assert fine["stability"] is None and fine["stability_status"] is None  # not a fine term
    assert rows["p0-0-fine"]["symmetry"] == 1.0
    assert rows["p0-1-coarse"]["status"] == "decode_error" and rows["p0-1-coarse"]["total"] is None
    assert rows["p0-1-fine"]["status"] == "gen_error" and rows["p0-1-fine"]["message"] == "ran out of budget"
    miss = rows["p1-0-coarse"]
    assert miss["status"] == "missing_renders:clip_score" and miss["total"] is None
    assert miss["clip_score_status"] == "missing_renders" and miss["stability_status"] == "ok"
    broken = rows["p1-1-fine"]
    assert broken["status"] == "image_error:clip_score" and broken["total"] is None
    assert broken["clip_score"] is None and "clip_score: image_error" in broken["message"]
    assert sum(r["clip_score_status"] == "image_error" for r in rows.values()) == 1  # only that row


def test_failed_backend_is_a_status_and_total_null(setup, tmp_path, monkeypatch):
    from rl3d.stages.rewards.clip import ClipBackend

    def boom(self, items):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(ClipBackend, "score", boom)
    d = setup
    args = ["--samples", d / "samples.parquet", "--renders", d / "renders.parquet", "--config", d / "cfg.toml",
            "--out", tmp_path / "r", "--quiet"]
    res = run_cli(args)  # every row failed: exit 3 with the count, nothing marked complete
    assert res.exit_code == 3 and "rows failed (backend_error:clip_score" in res.output
    assert run_cli([*args, "--allow-failures"]).exit_code == 0  # the rows, each with its status
    rows = {r["sample_id"]: r for r in tables.read_table(tmp_path / "r", "rewards").to_pylist()}
    r = rows["p2-0-coarse"]
    assert r["status"] == "backend_error:clip_score" and r["total"] is None and r["clip_score"] is None
    assert "CUDA out of memory" in r["clip_score_message"] and r["stability"] == 0.5


def test_optional_failed_term_gives_partial(setup, tmp_path):
    import pyarrow.compute as pc

    d = setup
    t = pq.read_table(d / "samples.parquet")
    empty = VoxelCodec.load().encode(np.zeros((32, 32, 32), np.uint8)).tolist()
    t = t.filter(pc.equal(t["sample_id"], "p2-1-fine"))
    t = t.set_column(t.column_names.index("mesh_tokens"), "mesh_tokens", pa.array([empty], pa.list_(pa.int32())))
    pq.write_table(t, tmp_path / "s.parquet")
    assert run_cli(["--samples", tmp_path / "s.parquet", "--renders", d / "renders.parquet", "--config",
                    d / "cfg.toml", "--out", tmp_path / "r", "--quiet"]).exit_code == 0
    r = tables.read_table(tmp_path / "r", "rewards").to_pylist()[0]
    assert r["symmetry_status"] == "empty_mesh" and r["status"] == "partial"
    assert r["total"] == pytest.approx(r["clip_score"])


def test_objects_table_reference_scoring_without_renders(tmp_path):
    cfg = tmp_path / "g.toml"
    cfg.write_text('[[levels.single]]\nname = "floating_parts"\nbackend = "geometry"\naggregate = "none"\n')
    g2 = grid_cube()
    g2[20:22, 20:22, 20:22] = 1
    types = dict(tables.SCHEMAS["objects"][1])
    cols = {k: [] for k in types}
    for i, g in enumerate((grid_cube(), g2)):
        for k, v in dict(sample_id=f"syn-{i}", prompt_id=f"syn-{i}", prompt="a cube", category="c", family="f",
                         split="train", spec="{}", plan="", detail="", voxels=to_bytes(g), mesh_tokens=[0],
                         mesh_path="", status="ok", message="").items():
            cols[k].append(v)
    pq.write_table(pa.table({k: pa.array(v, types[k]) for k, v in cols.items()}), tmp_path / "o.parquet")
    res = run_cli(["--samples", tmp_path / "o.parquet", "--config", cfg, "--out", tmp_path / "r", "--quiet"])
    assert res.exit_code == 0, res.output
    rows = {r["sample_id"]: r for r in tables.read_table(tmp_path / "r", "rewards").to_pylist()}
    assert rows["syn-0"]["total"] == 1.0 and rows["syn-1"]["total"] == 0.5
    assert rows["syn-1"]["level"] == "single" and rows["syn-1"]["sample_index"] == 0
    # the default preset has no "single" level: a clear error, exit 2
    res = CliRunner().invoke(main, ["reward", "--samples", str(tmp_path / "o.parquet"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "level 'single'" in res.output and "flat" in res.output


def test_shards_union_equals_unsharded(setup, tmp_path):
    d = setup
    base = ["--samples", d / "samples.parquet", "--renders", d / "renders.parquet", "--config", d / "cfg.toml", "--quiet"]
    assert run_cli([*base, "--out", tmp_path / "all"]).exit_code == 0
    for i in range(2):
        assert run_cli([*base, "--out", tmp_path / "sh", "--shard", f"{i}/2"]).exit_code == 0
    a = tables.read_table(tmp_path / "all", "rewards").sort_by("sample_id")
    b = tables.read_table(tmp_path / "sh", "rewards").sort_by("sample_id")
    assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist()
    ta, tb = a.column("total").to_pylist(), b.column("total").to_pylist()
    assert [x is None for x in ta] == [x is None for x in tb]
    assert [x for x in ta if x is not None] == pytest.approx([x for x in tb if x is not None], abs=1e-5)
    assert a.column("status").to_pylist() == b.column("status").to_pylist()


def test_bad_config_exits_2_naming_key(setup, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[levels.fine]]\nname = "s"\nbackend = "geometry"\naggregate = "median"\n')
    res = CliRunner().invoke(main, ["reward", "--samples", str(setup / "samples.parquet"), "--config", str(bad),
                                    "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "levels.fine[0].aggregate" in res.output
