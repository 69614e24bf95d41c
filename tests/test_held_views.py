"""Rendered views held in memory for a later stage of the same process (stages/raycast/held_views.py,
rl3d train's CLIP term): the pixels of the files written, the same embeddings as decoding them. Views
held on a GPU are torch tensors there; CPU tensors stand in for them here."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from rl3d.formats.glb import write_glb
from rl3d.formats.tables import read_table
from rl3d.stages import render
from rl3d.stages.contract import StageOptions
from rl3d.stages.raycast import held_views, torch_renderer
from rl3d.stages.raycast.cameras import view_angles
from rl3d.stages.raycast.renderer import angle_tuples, prepare_mesh
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


# ---- views held as torch tensors (on the device that cast them) ----------------------------------

def test_held_tensors_are_what_was_held_and_released(tmp_path):
    held_views.release()
    f = tmp_path / "v.png"
    f.write_bytes(b"x")
    px = torch.arange(2 * 3 * 3, dtype=torch.uint8).view(2, 3, 3)
    host, device = held_views.room(), held_views.room("cpu")
    assert held_views.hold(f, px)
    assert held_views.held(f) is px
    assert held_views.room("cpu") == device - px.nbytes and held_views.room() == host  # the device's budget
    held_views.release()
    assert held_views.count() == 0 and held_views.held(f) is None and held_views.room("cpu") == device


def test_the_cap_on_held_device_memory_is_its_own(tmp_path, monkeypatch):
    held_views.release()
    monkeypatch.setattr(held_views, "MAX_DEVICE_BYTES", 100)
    monkeypatch.setattr(held_views, "MAX_BYTES", 100)
    files = []
    for name in ("a", "b", "c", "d"):
        files.append(tmp_path / f"{name}.png")
        files[-1].write_bytes(name.encode())
    assert held_views.hold(files[0], torch.zeros(64, dtype=torch.uint8))
    assert not held_views.hold(files[1], torch.zeros(64, dtype=torch.uint8))  # over the device's cap
    assert held_views.hold(files[2], np.zeros(64, np.uint8))  # host memory: another budget
    assert held_views.room("cpu") == 36 and held_views.room() == 36
    assert held_views.hold(files[0], np.zeros(30, np.uint8))  # held again as an array: the tensor's bytes freed
    assert held_views.room("cpu") == 100 and held_views.room() == 6
    assert not held_views.hold(files[3], np.zeros(10, np.uint8))
    assert held_views.count() == 2
    held_views.release()
    assert held_views.room("cpu") == 100 and held_views.room() == 100


def hold_as_tensors(paths):
    """The held arrays replaced by CPU tensors of the same pixels (what a GPU run holds, on the host)."""
    for p in paths:
        held_views.hold(p, torch.from_numpy(held_views.held(p).copy()))


@pytest.mark.parametrize("preprocess", ["pil", "device"])
def test_clip_embeddings_of_held_tensors_equal_the_decoded_files(glb_dir, tmp_path, monkeypatch, preprocess):
    paths = rendered(glb_dir, tmp_path / "renders", monkeypatch, resolution=48)
    hold_as_tensors(paths)
    assert all(isinstance(held_views.held(p), torch.Tensor) for p in paths)

    def no_decoding(p):
        raise AssertionError(f"{p} decoded while its view is held")
    monkeypatch.setattr("rl3d.stages.scoring.clip_scorer.load_rgb", no_decoding)
    if preprocess == "device":  # stacked as tensors where they are: never made numpy arrays on the way

        def no_array(*_, **__):
            raise AssertionError("a held tensor was made a numpy array")
        monkeypatch.setattr(torch.Tensor, "__array__", no_array)
    from_memory = ClipScorer(default_scorer_dir(), "cpu").image_embeddings(paths, 4, preprocess)
    monkeypatch.undo()
    held_views.release()
    from_files = ClipScorer(default_scorer_dir(), "cpu").image_embeddings(paths, 4, preprocess)
    assert not np.isnan(from_files).any()
    assert np.array_equal(from_memory, from_files)


def test_render_batch_adds_no_device_views_on_the_cpu():
    """On the CPU the numpy rgb is the memory the views were cast into: nothing else to hold."""
    az, el = angle_tuples(*view_angles(2))
    prepared = [prepare_mesh(m, az, el) for m in meshes()]
    plain = torch_renderer.render_batch(prepared, az, el, 16, 40.0, "cpu", 2)
    asked = torch_renderer.render_batch(prepared, az, el, 16, 40.0, "cpu", 2, device_rgb=True)
    for a, b in zip(plain, asked):
        assert set(a) == set(b) == {"rgb", "mask", "depth", "normal"}
        assert np.array_equal(a["rgb"], b["rgb"])


def with_device_views(monkeypatch):
    """render_batch as on a GPU: each mesh's rgb also as a tensor (a CPU one here), the same bits."""
    real = torch_renderer.render_batch

    def on_device(*a, device_rgb=False, **kw):
        out = real(*a, **kw)
        return [{**r, "device_rgb": torch.from_numpy(r["rgb"].copy())} for r in out] if device_rgb else out
    monkeypatch.setattr(torch_renderer, "render_batch", on_device)


def test_render_holds_the_device_views_within_the_device_room(glb_dir, tmp_path, monkeypatch):
    with_device_views(monkeypatch)
    paths = rendered(glb_dir, tmp_path / "renders", monkeypatch)
    assert len(paths) == 6 and held_views.count() == 6
    for p in paths:
        px = held_views.held(p)
        assert isinstance(px, torch.Tensor) and np.array_equal(px.numpy(), np.asarray(load_rgb(p)))
    one_mesh = 2 * 24 * 24 * 3  # 2 views of 24 px
    monkeypatch.setattr(held_views, "MAX_DEVICE_BYTES", one_mesh + 10)
    host = held_views.MAX_BYTES
    rendered(glb_dir, tmp_path / "again", monkeypatch)
    assert held_views.count() == 2 and held_views.room("cpu") == 10 and held_views.room() == host
    held_views.release()
