"""Kill -9 and resume, small: benchmarks/kill_resume.py's trials on two cheap stages, and the
manifest refresh after a kill between a shard's marker and its manifest."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from rl3d.formats import shards

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kill_resume.py"


@pytest.fixture(scope="module")
def kr():
    spec = importlib.util.spec_from_file_location("kill_resume", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["kill_resume"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


def small_stages(kr):
    """synth and render at toy sizes, killed at random delays and in the part / marker windows."""
    windows = ("*.part-*.tmp-*", "out/_shards/*.json")
    synth = dataclasses.replace(kr.STAGES["synth"], windows=windows,
                                args=lambda i, t: ["synth", "--n", "2", "--seed", "3", "--out", str(t / "out")])
    render = dataclasses.replace(kr.STAGES["render"], windows=windows,
                                 args=lambda i, t: ["render", "--samples", i["objects"], "--views", "1",
                                                    "--resolution", "16", "--workers", "1", "--no-sheet",
                                                    "--out", str(t / "out")])
    return synth, render


def test_kill_and_resume_loses_nothing(kr, tmp_path):
    inputs = {"objects": str(tmp_path / "objects")}
    rc, _ = kr.run_to_end(["synth", "--n", "2", "--seed", "3", "--out", inputs["objects"]], tmp_path / "log.txt")
    assert rc == 0
    for stage in small_stages(kr):
        result = kr.run_stage(stage, trials=2, work=tmp_path, seed=1, inputs=inputs, calibrate=False)
        c = result.counts()
        notes = [n for t in result.trials for n in t.notes]
        assert c["trials"] == 2
        assert (c["lost"], c["doubled"], c["torn"], c["manifests"], c["rerun_failed"]) == (0, 0, 0, 0, 0), notes
        assert c["identical"] == 2, notes


def test_compare_counts_lost_doubled_and_torn(kr):
    ref = kr.Snapshot(rows={"t": [(("a",), (("x", 1),)), (("b",), (("x", 2),))]}, blobs={"m.glb": "h1"})
    got = kr.Snapshot(rows={"t": [(("a",), (("x", 1),)), (("a",), (("x", 1),))]}, blobs={"m.glb": "h1"},
                      torn=["meshes/.tmp-1-a.glb (0 bytes, reader-visible)"])
    d = kr.compare(ref, got, {"files": [], "columns": {}})
    assert (d.lost, d.doubled, d.changed, d.torn, d.identical) == (1, 1, 0, 1, False)


def test_rerun_refreshes_a_manifest_left_stale_by_a_kill(tmp_path):
    """A kill after a shard's marker but before the manifest refresh: the rerun skips the shard and
    brings the manifest up to date (it said complete: false for good before)."""
    out, cfg, shard = tmp_path / "out", {"n": 1}, shards.Shard(0, 1)
    assert shards.begin(out, "synth", cfg, shard, overwrite=False)
    shards.write_part(pa.table({"sample_id": ["a"]}), out, shard)
    shards.atomic_write_json(shards.marker_path(out, shard), {"shard": 0})  # then SIGKILL
    assert json.loads((out / shards.MANIFEST).read_text())["complete"] is False

    assert not shards.begin(out, "synth", cfg, shard, overwrite=False)  # skipped: already complete
    m = json.loads((out / shards.MANIFEST).read_text())
    assert (m["complete"], m["completed_shards"]) == (True, [0])
