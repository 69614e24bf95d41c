"""Kill -9 and resume, small: benchmarks/kill_resume.py's trials on two cheap stages, and the
manifest refresh after a kill between a shard's marker and its manifest."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
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
                      torn=["meshes/a.glb: not loadable (ValueError)"])
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


def _dead_pid() -> int:
    return next(p for p in range(4_194_000, 4_000_000, -1) if not shards.pid_alive(p))


def test_rerun_sweeps_only_its_own_shards_stale_temps(tmp_path):
    """A rerun of shard 0/2 removes the hidden media, marker and part temps that a killed run of
    shard 0 left; shard 1's temps and those of a live process stay (they may be mid-write)."""
    out, cfg, me, other = tmp_path / "out", {"n": 1}, shards.Shard(0, 2), shards.Shard(1, 2)
    dead, alive = _dead_pid(), os.getpid()
    mine = [out / "_meshes" / f".tmp-{me.tag}-{dead}-s1.glb", out / "_images" / "s1" / f".tmp-{me.tag}-{dead}-view-00.png",
            out / "_shards" / f".{me.tag}.json.tmp-{me.tag}-{dead}"]
    kept = [out / "_meshes" / f".tmp-{other.tag}-{dead}-s2.glb",             # another shard's
            out / "_meshes" / f".tmp-{me.tag}-{alive}-s3.glb",               # a live process of this shard
            out / "_meshes" / f".tmp-{dead}-s4.glb",                         # written outside any shard
            out / f"._manifest.json.tmp-{me.tag}-{dead}",                    # several shards write the manifest
            out / "_shards" / f".{other.tag}.json.tmp-{other.tag}-{dead}"]
    for f in mine + kept:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    assert shards.begin(out, "gen", cfg, me, overwrite=False)
    assert [f for f in mine if f.exists()] == []
    assert [f for f in kept if not f.exists()] == []


def test_single_shard_rerun_sweeps_the_manifest_temp(tmp_path):
    out, shard = tmp_path / "out", shards.Shard(0, 1)
    stale = out / f"._manifest.json.tmp-{shard.tag}-{_dead_pid()}"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"{")
    assert shards.begin(out, "synth", {"n": 1}, shard, overwrite=False)
    assert not stale.exists()
    # killed after its marker, inside the manifest refresh: the rerun skips the shard and still sweeps
    shards.write_part(pa.table({"sample_id": ["a"]}), out, shard)
    shards.atomic_write_json(shards.marker_path(out, shard), {"shard": 0})
    stale.write_bytes(b"{")
    assert not shards.begin(out, "synth", {"n": 1}, shard, overwrite=False)
    assert not stale.exists() and json.loads((out / shards.MANIFEST).read_text())["complete"] is True


def test_temp_names_carry_the_shard_being_written(tmp_path):
    shard = shards.Shard(3, 8)
    with shards.writing_shard(shard):
        with shards.atomic_path(tmp_path / "_meshes" / "a.glb") as tmp:
            assert tmp.name == f".tmp-{shard.tag}-{os.getpid()}-a.glb"
            tmp.write_bytes(b"x")
        assert shards._tmp_name(tmp_path / "part.parquet").name == f".part.parquet.tmp-{shard.tag}-{os.getpid()}"
    assert shards.WRITER_ENV not in os.environ
    with shards.atomic_path(tmp_path / "b.glb") as tmp:  # outside a stage: the pid alone, as before
        assert tmp.name == f".tmp-{os.getpid()}-b.glb"
        tmp.write_bytes(b"x")


def test_hidden_leftovers_are_stale_and_visible_ones_torn(kr, tmp_path):
    """The accounting: a hidden temp (which rl3d's readers skip) is a stale temp, not a failure;
    a leftover under a visible name (a half-saved sft checkpoint) is torn output."""
    (tmp_path / "_meshes").mkdir()
    (tmp_path / "_meshes" / ".tmp-00000-of-00001-1-a.glb").write_bytes(b"")
    (tmp_path / "checkpoints" / "step-000002.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000002.tmp" / "trainer_state.pt").write_bytes(b"")
    snap = kr.snapshot(tmp_path)
    assert snap.stale == ["_meshes/.tmp-00000-of-00001-1-a.glb (0 bytes)"]
    assert snap.torn == ["checkpoints/step-000002.tmp (0 bytes, visible)"]
    d = kr.compare(kr.Snapshot(), kr.Snapshot(stale=snap.stale), {"files": [], "columns": {}})
    assert (d.stale, d.torn, d.identical) == (1, 0, True)
