"""Rendered views handed on without copies: to the render stage's PNG writers through shared memory
(stages/raycast/shared_arrays.py), and to a later stage of the same process in memory
(stages/raycast/held_views.py). Same files, same scores as through pipes and PNG decoding."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from rl3d.formats.glb import write_glb
from rl3d.formats.tables import read_table
from rl3d.stages import render
from rl3d.stages.contract import StageOptions
from rl3d.stages.raycast import held_views, shared_arrays
from rl3d.stages.raycast.shared_arrays import SharedArray, SharedBatch
from rl3d.stages.scoring.clip_scorer import ClipScorer, default_scorer_dir, load_rgb

from test_render_batched import meshes


def test_a_shared_array_pickles_as_a_handle_and_maps_the_same_values(tmp_path):
    batch = SharedBatch(1 << 20, directory=str(tmp_path))
    rgb = batch.alloc((2, 8, 8, 3), np.uint8)
    depth = batch.alloc((2, 8, 8), np.float32)
    rgb[:] = np.arange(rgb.size, dtype=np.uint64).reshape(rgb.shape) % 251
    depth[:] = np.linspace(0, 1, depth.size, dtype=np.float32).reshape(depth.shape)
    handles = [batch.handle(rgb[1]), batch.handle(depth[0])]
    assert all(isinstance(h, SharedArray) for h in handles)
    assert handles[1].offset % shared_arrays.ALIGN == 0
    wire = pickle.dumps(handles)
    assert len(wire) < 600  # the handle, not the pixels
    got = [shared_arrays.resolved(h) for h in pickle.loads(wire)]
    assert np.array_equal(got[0], rgb[1]) and np.array_equal(got[1], depth[0])
    plain = np.ones(3)
    assert batch.handle(plain) is plain and shared_arrays.resolved(plain) is plain
    batch.close()
    assert not any(tmp_path.iterdir())
    assert np.array_equal(got[0], rgb[1])  # still mapped after the file is removed


def test_a_full_batch_gives_ordinary_memory_which_is_pickled(tmp_path):
    batch = SharedBatch(100, directory=str(tmp_path))
    inside = batch.alloc((64,), np.uint8)
    outside = batch.alloc((64,), np.uint8)
    assert isinstance(batch.handle(inside), SharedArray)
    assert batch.handle(outside) is outside
    batch.close()


def test_too_little_shared_memory_is_not_used(tmp_path, monkeypatch):
    assert not shared_arrays.usable(1, str(tmp_path / "missing"))
    monkeypatch.setattr(shared_arrays, "shm_free_bytes", lambda d: 3000)
    assert shared_arrays.usable(1500, str(tmp_path)) and not shared_arrays.usable(1501, str(tmp_path))


def test_files_of_processes_that_are_gone_are_removed(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{shared_arrays.PREFIX}-{int(gone.stdout)}-0"
    live = tmp_path / f"{shared_arrays.PREFIX}-{os.getppid()}-0"
    other = tmp_path / "someone-elses-file"
    for f in (stale, live, other):
        f.write_bytes(b"x")
    SharedBatch(64, directory=str(tmp_path)).close()
    assert not stale.exists() and live.exists() and other.exists()


@pytest.fixture
def glb_dir(tmp_path):
    d = tmp_path / "glbs"
    d.mkdir()
    for i, m in enumerate(meshes()):
        write_glb(m, d / f"m{i}.glb")
    (d / "z-broken.glb").write_bytes(b"glTF\x02\x00\x00\x00garbage")
    return d


def test_writer_processes_get_the_views_through_shared_memory_and_write_the_same_files(glb_dir, tmp_path,
                                                                                        monkeypatch):
    """Worker processes mapping the views write the same bytes as pickled views; no file is left."""
    made = []
    real = render.SharedBatch

    def counted(nbytes):
        made.append(real(nbytes))
        return made[-1]

    monkeypatch.setattr(render, "MIN_JOBS_FOR_PROCESSES", 2)
    kw = dict(views=2, resolution=24, backend="torch", device="cpu", depth=True, normals=True, workers=2)
    monkeypatch.setattr(render, "usable", lambda n: False)
    render.run_render(glb_dir, StageOptions(out=tmp_path / "pickled", quiet=True), **kw)
    assert not made
    monkeypatch.setattr(render, "usable", lambda n: True)
    monkeypatch.setattr(render, "SharedBatch", counted)
    render.run_render(glb_dir, StageOptions(out=tmp_path / "shared", quiet=True), **kw)
    assert made and all(not os.path.exists(b.path) for b in made)
    a, b = read_table(tmp_path / "pickled", "renders"), read_table(tmp_path / "shared", "renders")
    media = ["image_path", "depth_path", "normal_path", "sheet_path"]
    assert a.drop(media).equals(b.drop(media))
    rows = a.to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 6 + ["render_error"] * 2
    for r in rows[:6]:
        for col in media:
            rel = r[col].split("/pickled/")[1]
            assert (tmp_path / "pickled" / rel).read_bytes() == (tmp_path / "shared" / rel).read_bytes()


def test_held_views_are_the_written_pixels_until_the_file_changes(glb_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(render, "MIN_JOBS_FOR_PROCESSES", 2)
    held_views.release()
    out = tmp_path / "renders"
    render.RenderJob(glb_dir, views=2, resolution=24, backend="torch", device="cpu", workers=2,
                     hold_views=True).run(StageOptions(out=out, quiet=True))
    paths = [r["image_path"] for r in read_table(out, "renders").to_pylist() if r["status"] == "ok"]
    assert len(paths) == 6 and held_views.count() == 6
    for p in paths:
        assert np.array_equal(held_views.held(p), np.asarray(load_rgb(p)))
    os.replace(paths[1], paths[0])  # another file at that path now
    assert held_views.held(paths[0]) is None and held_views.held(paths[1]) is None
    assert held_views.held(paths[2]) is not None
    held_views.release()
    assert held_views.count() == 0 and held_views.held(paths[2]) is None


def test_not_held_without_asking(glb_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(render, "MIN_JOBS_FOR_PROCESSES", 2)
    held_views.release()
    render.RenderJob(glb_dir, views=2, resolution=24, backend="torch", device="cpu",
                     workers=2).run(StageOptions(out=tmp_path / "r", quiet=True))
    assert held_views.count() == 0


def test_the_cap_on_held_memory(tmp_path, monkeypatch):
    held_views.release()
    f = tmp_path / "v.png"
    f.write_bytes(b"x")
    monkeypatch.setattr(held_views, "MAX_BYTES", 100)
    assert held_views.hold(f, np.zeros(64, np.uint8))
    assert not held_views.hold(tmp_path / "w.png", np.zeros(8, np.uint8))  # no such file
    f2 = tmp_path / "v2.png"
    f2.write_bytes(b"y")
    assert not held_views.hold(f2, np.zeros(64, np.uint8))  # over the cap
    assert held_views.count() == 1
    held_views.release()


@pytest.mark.parametrize("preprocess", ["pil", "device"])
def test_clip_embeddings_of_held_views_equal_the_decoded_files(glb_dir, tmp_path, monkeypatch, preprocess):
    monkeypatch.setattr(render, "MIN_JOBS_FOR_PROCESSES", 2)
    held_views.release()
    out = tmp_path / "renders"
    render.RenderJob(glb_dir, views=2, resolution=48, backend="torch", device="cpu", workers=2,
                     hold_views=True).run(StageOptions(out=out, quiet=True))
    paths = [r["image_path"] for r in read_table(out, "renders").to_pylist() if r["status"] == "ok"]
    decodes = []
    monkeypatch.setattr("rl3d.stages.scoring.clip_scorer.load_rgb", lambda p: decodes.append(p) or load_rgb(p))
    from_memory = ClipScorer(default_scorer_dir(), "cpu").image_embeddings(paths, 4, preprocess)
    assert decodes == []
    held_views.release()
    from_files = ClipScorer(default_scorer_dir(), "cpu").image_embeddings(paths, 4, preprocess)
    assert len(decodes) == len(paths)
    assert np.array_equal(from_memory, from_files)
