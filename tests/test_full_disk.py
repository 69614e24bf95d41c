"""A full disk mid-write (ENOSPC, simulated by making the write raise as pyarrow and file objects
do: an errno and no file name): one line naming the file, exit 2, nothing already written damaged,
no temp left, and a rerun once space is free completes as an uninterrupted run."""
from __future__ import annotations

import errno
import json
import os

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rl3d.cli.main import main
from rl3d.formats import shards

ENOSPC = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")


def _synth(out, shard, n=4):
    return CliRunner().invoke(main, ["synth", "--n", str(n), "--seed", "3", "--no-meshes", "--shard", shard,
                                     "--out", str(out), "--quiet"])


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _one_line_error(res, path):
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and "Traceback" not in res.output, res.stderr
    assert lines[0].endswith(f" synth: error: {path}: No space left on device"), lines[0]


@pytest.fixture
def reference(tmp_path):
    ref = tmp_path / "ref"
    for s in ("0/2", "1/2"):
        assert _synth(ref, s).exit_code == 0
    return pq.read_table(ref).to_pylist()


def test_full_disk_on_the_part_write(tmp_path, monkeypatch, reference):
    out = tmp_path / "out"
    assert _synth(out, "0/2").exit_code == 0
    before = _files(out)
    write_table = pq.write_table

    def full(table, where, **kw):
        with open(where, "wb") as f:  # some bytes got out before the disk filled
            f.write(b"PAR1 partial")
        raise ENOSPC

    monkeypatch.setattr(shards.pq, "write_table", full)
    res = _synth(out, "1/2")
    _one_line_error(res, shards.part_path(out, shards.Shard(1, 2)))
    after = _files(out)
    assert sorted(after) == sorted(before)  # no part, marker or temp of shard 1
    assert [k for k, v in before.items() if k != "_manifest.json" and after[k] != v] == []  # shard 0 untouched
    m = json.loads((out / "_manifest.json").read_text())
    assert (m["completed_shards"], m["complete"]) == ([0], False)

    monkeypatch.setattr(shards.pq, "write_table", write_table)  # space freed
    assert _synth(out, "1/2").exit_code == 0
    assert pq.read_table(out).to_pylist() == reference
    assert json.loads((out / "_manifest.json").read_text())["complete"] is True
    assert {k: v for k, v in _files(out).items() if k.startswith("part-00000")} == \
        {k: v for k, v in before.items() if k.startswith("part-00000")}


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to tell the marker's fd")
def test_full_disk_on_the_marker_write(tmp_path, monkeypatch, reference):
    """The part is written, then the disk fills on the completion marker: the shard stays
    unfinished (no marker), the manifest stays valid JSON, and the rerun redoes the shard."""
    out = tmp_path / "out"
    assert _synth(out, "0/2").exit_code == 0
    fsync = os.fsync

    def fsync_then_full(fd):
        if f"/{shards.MARKERS}/" in os.readlink(f"/proc/self/fd/{fd}"):  # the part passes, the marker not
            raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(shards.os, "fsync", fsync_then_full)
    res = _synth(out, "1/2")
    monkeypatch.setattr(shards.os, "fsync", fsync)
    _one_line_error(res, shards.marker_path(out, shards.Shard(1, 2)))
    assert not shards.marker_path(out, shards.Shard(1, 2)).exists()
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name]
    assert json.loads((out / "_manifest.json").read_text())["complete"] is False
    assert _synth(out, "1/2").exit_code == 0
    assert pq.read_table(out).to_pylist() == reference


def test_atomic_writes_keep_the_old_file_and_name_the_new_one(tmp_path, monkeypatch):
    final = tmp_path / "_manifest.json"
    final.write_bytes(b'{"old": true}')
    monkeypatch.setattr(shards.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(OSError) as e:
        shards.atomic_write_json(final, {"new": True})
    assert (e.value.errno, e.value.filename, e.value.strerror) == (errno.ENOSPC, str(final), os.strerror(errno.ENOSPC))
    assert final.read_bytes() == b'{"old": true}' and sorted(p.name for p in tmp_path.iterdir()) == ["_manifest.json"]

    glb = tmp_path / "_meshes" / "a.glb"
    with pytest.raises(OSError) as e:
        with shards.atomic_path(glb) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")  # as PIL / trimesh raise it
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(glb))
    assert list((tmp_path / "_meshes").iterdir()) == []
