"""Rendered views held in memory for a later stage of the same process (stages/raycast/held_views.py,
rl3d train's CLIP term): the pixels of the files written, the same embeddings as decoding them."""
from __future__ import annotations

import os

import numpy as np
import pytest

from rl3d.formats.glb import write_glb
from rl3d.formats.tables import read_table
from rl3d.stages import render
from rl3d.stages.contract import StageOptions
from rl3d.stages.raycast import held_views
from rl3d.stages.scoring.clip_scorer import ClipScorer, default_scorer_dir, load_rgb

from test_render_batched import meshes


@pytest.fixture
def glb_dir(tmp_path):
    d = tmp_path / "glbs"
    d.mkdir()
    for i, m in enumerate(meshes()):
        write_glb(m, d / f"m{i}.glb")
    (d / "z-broken.glb").write_bytes(b"glTF\x02\x00\x00\x00garbage")
    return d


def rendered(glb_dir, out, monkeypatch, resolution=24, hold=True) -> list[str]:
    """The image paths of an in-loop render (torch backend, worker processes; held_views cleared first)."""
    monkeypatch.setattr(render, "MIN_JOBS_FOR_PROCESSES", 2)
    held_views.release()
    render.RenderJob(glb_dir, views=2, resolution=resolution, backend="torch", device="cpu", workers=2,
                     hold_views=hold).run(StageOptions(out=out, quiet=True))
    return [r["image_path"] for r in read_table(out, "renders").to_pylist() if r["status"] == "ok"]


def test_held_views_are_the_written_pixels_until_the_file_changes(glb_dir, tmp_path, monkeypatch):
    paths = rendered(glb_dir, tmp_path / "renders", monkeypatch)
    assert len(paths) == 6 and held_views.count() == 6
    for p in paths:
        assert np.array_equal(held_views.held(p), np.asarray(load_rgb(p)))
    os.replace(paths[1], paths[0])  # another file at that path now
    assert held_views.held(paths[0]) is None and held_views.held(paths[1]) is None
    assert held_views.held(paths[2]) is not None
    held_views.release()
    assert held_views.count() == 0 and held_views.held(paths[2]) is None


def test_not_held_without_asking(glb_dir, tmp_path, monkeypatch):
    assert len(rendered(glb_dir, tmp_path / "r", monkeypatch, hold=False)) == 6
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
    paths = rendered(glb_dir, tmp_path / "renders", monkeypatch, resolution=48)
    decodes = []
    monkeypatch.setattr("rl3d.stages.scoring.clip_scorer.load_rgb", lambda p: decodes.append(p) or load_rgb(p))
    from_memory = ClipScorer(default_scorer_dir(), "cpu").image_embeddings(paths, 4, preprocess)
    assert decodes == []
    held_views.release()
    from_files = ClipScorer(default_scorer_dir(), "cpu").image_embeddings(paths, 4, preprocess)
    assert len(decodes) == len(paths)
    assert np.array_equal(from_memory, from_files)


def test_render_holds_no_more_than_the_room_left(glb_dir, tmp_path, monkeypatch):
    """Views past the cap are not even kept while rendering: the rest is read from disk."""
    one_mesh = 2 * 24 * 24 * 3  # 2 views of 24 px
    monkeypatch.setattr(held_views, "MAX_BYTES", one_mesh + 10)
    rendered(glb_dir, tmp_path / "renders", monkeypatch)
    assert held_views.count() == 2 and held_views.room() == 10
    held_views.release()
