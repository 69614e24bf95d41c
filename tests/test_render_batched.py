"""The torch renderer's batched path (many meshes at once, the default on CUDA): the same bits as
the per-mesh cone-culled caster with numpy shading, through the library and the render stage."""
from __future__ import annotations

import numpy as np
import pytest
import trimesh

from rl3d.formats.glb import write_glb
from rl3d.formats.tables import read_table
from rl3d.formats.voxels import color_id, grid_to_mesh
from rl3d.stages import render
from rl3d.stages.contract import StageOptions
from rl3d.stages.raycast import engines, torch_engine, torch_renderer
from rl3d.stages.raycast.cameras import view_angles
from rl3d.stages.raycast.renderer import angle_tuples, cast_camera_rays, prepare_mesh, render_views, shade_hits


def grid_mesh(*boxes):
    g = np.zeros((32, 32, 32), np.uint8)
    for (x0, x1, y0, y1, z0, z1), colour in boxes:
        g[x0:x1, y0:y1, z0:z1] = color_id(colour)
    return grid_to_mesh(g)


def meshes():
    """Voxel meshes (axis-aligned faces, coplanar neighbours, ties) and a slanted lumpy sphere."""
    sphere = trimesh.creation.uv_sphere(radius=0.4, count=[12, 12])
    v = np.asarray(sphere.vertices) * (1 + 0.1 * np.sin(7 * np.asarray(sphere.vertices)[:, :1]))
    rgba = np.tile([40, 160, 90, 255], (len(sphere.faces), 1)).astype(np.uint8)
    return [grid_mesh(((8, 24, 0, 16, 8, 24), "red")),
            grid_mesh(((10, 16, 0, 4, 10, 18), "red"), ((12, 14, 4, 12, 12, 14), "blue"), ((20, 23, 0, 3, 20, 23), "yellow")),
            trimesh.Trimesh(vertices=v, faces=sphere.faces, face_colors=rgba, process=False)]


def reference(prepared, az, el, res, k):
    """The per-mesh path: the cone-culled torch caster on the shared camera rays, numpy shading."""
    return [shade_hits(p, cast_camera_rays(p.verts, p.faces, az, el, res * k, 40.0, "torch", "cpu"), k) for p in prepared]


@pytest.mark.parametrize("framing, k", [("object", 1), ("object", 2), ("cube", 2)])
def test_batched_render_is_bitwise_the_per_mesh_render(framing, k):
    az, el = angle_tuples(*view_angles(4))
    prepared = [prepare_mesh(m, az, el, 40.0, "#102030", framing=framing) for m in meshes()]
    want = reference(prepared, az, el, 40, k)
    # a small pair budget: many steps, boxes split across steps
    got = torch_renderer.render_batch(prepared, az, el, 40, 40.0, "cpu", k, max_pairs=5000)
    for a, b in zip(want, got):
        for key in ("rgb", "depth", "normal", "mask"):
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
            assert np.array_equal(a[key].view(np.uint8), b[key].view(np.uint8)), key  # same bits, -0.0 too
    assert all(g["mask"].any() for g in got)


def test_render_views_torch_uses_the_batched_path_and_batches_split():
    az, el = view_angles(3)
    one = render_views(meshes()[1], az, el, 32, backend="torch", device="cpu", supersample=2)
    prepared = [prepare_mesh(m, *angle_tuples(az, el)) for m in meshes()]
    many = torch_renderer.render_batch(prepared, *angle_tuples(az, el), 32, 40.0, "cpu", 2)
    assert all(np.array_equal(one[k], many[1][k]) for k in ("rgb", "depth", "normal", "mask"))


def test_cast_meshes_skips_triangles_behind_or_off_screen_and_sees_ones_around_the_camera():
    az, el = angle_tuples([0.0], [0.0])
    cams = torch_renderer.device_cameras(az, el, 16, 40.0, "cpu")
    eye = cams.eye[0].numpy()
    behind = np.array([[-1, -1, 1], [1, -1, 1], [0, 1, 1]], np.float32) + eye  # wholly behind the camera
    aside = np.array([[50, 0, 0], [51, 0, 0], [50, 1, 0]], np.float32)         # in front, off screen
    # a big triangle through the camera plane: reaches behind it, so every pixel is tested
    across = np.array([[-5, -5, eye[2] + 1], [5, -5, eye[2] + 1], [0, 5, -5]], np.float32)
    f = np.arange(3, dtype=np.uint32).reshape(1, 3)
    tri, _, _ = torch_engine._mesh_batch([(behind, f), (aside, f), (across, f)], "cpu")
    _, _, rows, cols = torch_engine._pixel_boxes(tri, cams)
    assert (rows * cols)[0].tolist() == [0, 0, 16 * 16]
    keys = torch_engine.cast_meshes([(behind, f), (across, f)], cams)
    t, ids = torch_engine.keys_to_hits(keys)
    assert (ids[0] == int(engines.INVALID_ID)).all() and (ids[1] == 0).any()


def test_auto_backend_is_torch_where_cuda_is(monkeypatch):
    monkeypatch.setattr(engines, "cuda_available", lambda: True)
    assert engines.resolve_backend("auto") == "torch"
    monkeypatch.setattr(engines, "cuda_available", lambda: False)
    monkeypatch.setattr(engines, "open3d_available", lambda: True)
    assert engines.resolve_backend("auto") == "open3d"


def test_stage_worker_processes_write_the_same_files(tmp_path, monkeypatch):
    """The torch backend with reader/writer processes: the same PNG bytes and rows as in-process."""
    d = tmp_path / "glbs"
    d.mkdir()
    for i, m in enumerate(meshes()):
        write_glb(m, d / f"m{i}.glb")
    (d / "z-broken.glb").write_bytes(b"glTF\x02\x00\x00\x00garbage")
    kw = dict(views=2, resolution=24, backend="torch", device="cpu", depth=True)
    render.run_render(d, StageOptions(out=tmp_path / "threads", quiet=True), workers=1, **kw)
    monkeypatch.setattr(render, "MIN_JOBS_FOR_PROCESSES", 2)
    render.run_render(d, StageOptions(out=tmp_path / "procs", quiet=True), workers=2, **kw)
    a, b = read_table(tmp_path / "threads", "renders"), read_table(tmp_path / "procs", "renders")
    assert a.drop(["image_path", "depth_path", "sheet_path"]).equals(b.drop(["image_path", "depth_path", "sheet_path"]))
    rows = a.to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 6 + ["render_error"] * 2
    for r in rows[:6]:
        for col in ("image_path", "depth_path", "sheet_path"):
            rel = r[col].split("/threads/")[1]
            assert (tmp_path / "threads" / rel).read_bytes() == (tmp_path / "procs" / rel).read_bytes()


def test_a_failing_batch_is_retried_mesh_by_mesh(monkeypatch):
    az, el = angle_tuples(*view_angles(2))
    prepared = [prepare_mesh(m, az, el) for m in meshes()]
    real = torch_renderer.render_batch

    def flaky(part, *a, **kw):
        if any(p is prepared[1] for p in part):
            raise RuntimeError("CUDA out of memory")
        return real(part, *a, **kw)

    monkeypatch.setattr(torch_renderer, "render_batch", flaky)
    opts = render.RenderOptions(views=2, resolution=16, backend="torch", device="cpu")
    out = render._render_prepared(prepared, az, el, opts)
    assert isinstance(out[1], RuntimeError) and out[0]["rgb"].shape == (2, 16, 16, 3) and out[2]["rgb"].any()


# ---- a solid's faces turned away from the camera are skipped ------------------------------------

def test_solid_winding_of_closed_open_and_inside_out_meshes():
    from rl3d.stages.raycast.renderer import solid_winding

    voxels, _, sphere = meshes()
    assert solid_winding(voxels.vertices, voxels.faces) == 1   # a vertex per face corner: matched by position
    assert solid_winding(sphere.vertices, sphere.faces) == 1
    assert solid_winding(sphere.vertices, sphere.faces[:, ::-1]) == -1
    assert solid_winding(sphere.vertices, sphere.faces[1:]) == 0   # a hole
    plane = trimesh.creation.box().faces[:2]
    assert solid_winding(trimesh.creation.box().vertices, plane) == 0
    assert solid_winding(np.zeros((0, 3)), np.zeros((0, 3), int)) == 0


@pytest.mark.parametrize("k", [1, 2])
def test_skipping_back_faces_halves_the_pairs_and_keeps_the_images(monkeypatch, k):
    """The same rgb, depth and normals with and without skipping (inside-out meshes too), from
    about half the (ray, triangle) pairs."""
    import dataclasses

    tested = []
    real = torch_engine._pair_keys
    monkeypatch.setattr(torch_engine, "_pair_keys", lambda d, f, ids: tested.append(len(ids)) or real(d, f, ids))
    az, el = angle_tuples(*view_angles(4))
    ms = meshes()
    ms.append(trimesh.Trimesh(ms[2].vertices, ms[2].faces[:, ::-1], face_colors=ms[2].visual.face_colors,
                              process=False))
    solid = [prepare_mesh(m, az, el, 40.0, "#102030") for m in ms]
    assert [p.solid for p in solid] == [1, 1, 1, -1]
    every = [dataclasses.replace(p, solid=0) for p in solid]
    a = torch_renderer.render_batch(every, az, el, 48, 40.0, "cpu", k)
    all_pairs, tested[:] = sum(tested), []
    b = torch_renderer.render_batch(solid, az, el, 48, 40.0, "cpu", k)
    assert sum(tested) < 0.6 * all_pairs
    for x, y in zip(a, b):
        for c in ("rgb", "depth", "mask", "normal"):
            assert np.array_equal(x[c], y[c]), c


def test_all_faces_is_another_render_config_on_torch_only(tmp_path):
    d = tmp_path / "glbs"
    d.mkdir()
    write_glb(meshes()[0], d / "m.glb")
    torch_a = render.RenderJob(d, views=1, resolution=16, backend="torch", device="cpu").config()
    torch_b = render.RenderJob(d, views=1, resolution=16, backend="torch", device="cpu", skip_back_faces=False).config()
    assert torch_a["skip_back_faces"] is True and torch_b["skip_back_faces"] is False
    if engines.open3d_available():
        assert "skip_back_faces" not in render.RenderJob(d, views=1, resolution=16, backend="open3d").config()


def test_render_batch_brings_back_only_the_views_asked_for():
    """render asks for the views it writes (rgb alone by default): the others come back as None and
    the asked ones are the same bits as with everything asked."""
    from rl3d.stages.raycast.renderer import prepare_mesh as prepare
    from rl3d.stages.render import RenderOptions, written_views

    az, el = angle_tuples(*view_angles(2))
    prepared = [prepare(m, az, el) for m in meshes()]
    every = torch_renderer.render_batch(prepared, az, el, 24, 40.0, "cpu", 2)
    asked = written_views(RenderOptions())
    assert asked == {"rgb"}
    some = torch_renderer.render_batch(prepared, az, el, 24, 40.0, "cpu", 2, host=asked)
    for a, b in zip(every, some):
        assert set(b) == set(a) and b["mask"] is None and b["depth"] is None and b["normal"] is None
        assert np.array_equal(a["rgb"], b["rgb"])
    assert written_views(RenderOptions(depth=True, normals=True)) == {"rgb", "depth", "normal", "mask"}
