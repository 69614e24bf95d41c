"""`rl3d render`: determinism, sizes, colours, orientation, error rows, sharding."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from rl3d.cli.main import main
from rl3d.formats.glb import write_glb
from rl3d.formats.tables import read_table
from rl3d.formats.voxels import color_id, grid_to_mesh
from rl3d.stages.policy.device import pick_device
from rl3d.stages.raycast import engines, open3d_engine, torch_engine
from rl3d.stages.raycast.cameras import cached_cameras, camera_frames, fit_distance, object_scale, view_angles
from rl3d.stages.raycast.renderer import mesh_arrays, render_views
from rl3d.stages.raycast.shading import parse_color

RES = 96


def grid_with(*boxes) -> np.ndarray:
    g = np.zeros((32, 32, 32), np.uint8)
    for (x0, x1, y0, y1, z0, z1), colour in boxes:
        g[x0:x1, y0:y1, z0:z1] = color_id(colour)
    return g


def red_cube():
    return grid_to_mesh(grid_with(((8, 24, 0, 16, 8, 24), "red")))


def column():
    """Tall in +Y: a red column with a yellow top."""
    return grid_to_mesh(grid_with(((13, 19, 0, 26, 13, 19), "red"), ((13, 19, 26, 32, 13, 19), "yellow")))


def test_render_views_shapes_background_and_determinism():
    az, el = view_angles(6)
    a = render_views(red_cube(), az, el, RES, background="#102030")
    b = render_views(red_cube(), az, el, RES, background="#102030")
    assert a["rgb"].shape == (6, RES, RES, 3) and a["rgb"].dtype == np.uint8
    assert a["depth"].shape == a["mask"].shape == (6, RES, RES) and a["normal"].shape == (6, RES, RES, 3)
    for k in ("rgb", "depth", "normal", "mask"):
        assert np.array_equal(a[k], b[k])
    m = a["mask"]
    assert 0.05 < m.mean() < 0.8 and m.reshape(6, -1).any(1).all()  # every view sees the object
    assert (a["rgb"][~m] == (16, 32, 48)).all()                       # background exact
    assert (a["depth"][m] > 0).all() and (a["depth"][~m] == 0).all()
    n = np.linalg.norm(a["normal"][m], axis=-1)
    assert np.allclose(n, 1, atol=1e-4) and (a["normal"][m][:, 2] >= 0).all()  # facing the camera


def test_red_cube_is_red_and_lit():
    az, el = view_angles(4)
    out = render_views(red_cube(), az, el, RES)
    fg = out["rgb"][out["mask"]].astype(int)
    assert (fg[:, 0] > fg[:, 1] + 60).all() and (fg[:, 0] > fg[:, 2] + 60).all()
    assert len(np.unique(fg[:, 0])) >= 2  # faces are shaded differently (lit, not flat fill)


def test_orientation_tall_object_top_at_top_and_x_to_the_right():
    out = render_views(column(), [0.0, 90.0], [0.0, 20.0], RES)
    for v in range(2):
        ys, xs = np.nonzero(out["mask"][v])
        assert np.ptp(ys) > 2 * np.ptp(xs)  # tall in +Y -> tall in the image
        rgb = out["rgb"][v]
        yellow = (rgb[..., 0] > 120) & (rgb[..., 1] > 100) & (rgb[..., 2] < 60)
        red = (rgb[..., 0] > 100) & (rgb[..., 1] < 60)
        assert np.nonzero(yellow)[0].mean() < np.nonzero(red)[0].mean()  # top at the top
    # front view (azimuth 0, camera on +Z): +X (the object's left) is on the image's right
    side = grid_to_mesh(grid_with(((26, 32, 0, 6, 14, 18), "blue")))
    front = render_views(side, [0.0], [0.0], RES, framing="cube")
    assert np.nonzero(front["mask"][0])[1].mean() > RES * 0.6


def test_framing_object_centres_and_fills_cube_keeps_scale():
    small = grid_to_mesh(grid_with(((0, 8, 0, 8, 0, 8), "green")))  # a small box in a corner
    az, el = view_angles(6)
    obj = render_views(small, az, el, RES)
    cube = render_views(small, az, el, RES, framing="cube")
    assert obj["mask"].sum() > 8 * cube["mask"].sum()
    for v in range(6):
        ys, xs = np.nonzero(obj["mask"][v])
        assert abs(xs.mean() - RES / 2) < RES * 0.08 and abs(ys.mean() - RES / 2) < RES * 0.1  # centred
        assert 0.5 * RES < max(np.ptp(xs), np.ptp(ys)) < 0.85 * RES  # fills ~60-80%
    # depth is in mesh units under both framings: the nearest corner of a centred box of half
    # size h lies at z = D - h * sum|fwd| for a camera at distance D from its centre
    centred = grid_with(((12, 20, 12, 20, 12, 20), "green"))
    mesh = grid_to_mesh(centred)
    _, _, _, fwd = camera_frames(az, el, 1.0)
    d_cube = fit_distance(40.0, az, el)
    d_obj = d_cube / object_scale(np.asarray(mesh.vertices, np.float32), 40.0, az, el)[1]
    for framing, dist in (("object", d_obj), ("cube", d_cube)):
        out = render_views(mesh, az, el, RES, framing=framing)
        for v in range(6):
            expect = dist - 0.125 * np.abs(fwd[v]).sum()
            assert out["depth"][v][out["mask"][v]].min() == pytest.approx(expect, rel=0.02)


def test_parse_color():
    assert parse_color("white") == (255, 255, 255) and parse_color("#ff0000") == (255, 0, 0)
    from rl3d.formats.errors import InputError

    with pytest.raises(InputError, match="--background"):
        parse_color("nocolour")


@pytest.fixture(scope="module")
def glb_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("glbs")
    write_glb(red_cube(), d / "cube.glb")
    write_glb(column(), d / "column.glb")
    (d / "broken.glb").write_bytes(b"glTF\x02\x00\x00\x00garbage")
    return d


def run_cli(*args):
    return CliRunner().invoke(main, ["render", *args, "--quiet"])


def test_cli_glb_dir_outputs_and_error_rows(glb_dir, tmp_path):
    r = run_cli("--samples", str(glb_dir), "--out", str(tmp_path / "r"), "--resolution", "64", "--views", "6",
                "--depth", "--normals", "--workers", "1", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["meshes"] == 3 and summary["failed_meshes"] == 1 and summary["rows"] == 18
    t = read_table(tmp_path / "r", "renders").to_pylist()
    broken = [x for x in t if x["sample_id"] == "broken"]
    assert len(broken) == 6 and all(x["status"] == "render_error" and "broken.glb" in x["message"] for x in broken)
    assert all(not x["image_path"] for x in broken)
    ok = [x for x in t if x["status"] == "ok"]
    assert len(ok) == 12 and sorted({x["view"] for x in ok}) == list(range(6))
    for x in ok:
        img = Image.open(x["image_path"])
        assert img.size == (64, 64) and img.mode == "RGB"
        assert Image.open(x["depth_path"]).mode.startswith("I")  # 16-bit depth
        assert np.asarray(Image.open(x["normal_path"])).shape == (64, 64, 3)
    sheet = Image.open(ok[0]["sheet_path"])
    assert sheet.width > sheet.height  # 3 x 2 grid + caption
    assert ok[0]["image_path"].startswith(str((tmp_path / "r").resolve()))  # absolute once read
    stored = [v for v in pq.read_table(tmp_path / "r" / "part-00000-of-00001.parquet").column("image_path").to_pylist() if v]
    assert stored and all(v.startswith("_images/") for v in stored)  # relative on disk


def test_cli_png_bytes_are_deterministic(glb_dir, tmp_path):
    for name in ("a", "b"):
        assert run_cli("--samples", str(glb_dir), "--out", str(tmp_path / name), "--resolution", "64",
                       "--workers", "1").exit_code == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "_images").rglob("*.png"))
    assert len(files) == 2 * 7  # 6 views + sheet per good mesh
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def samples_table(path, glb_dir):
    rows = []
    for p in range(4):
        for i in range(2):
            rows.append({"sample_id": f"p{p}-{i}-single", "prompt_id": f"p{p}", "sample_index": i, "level": "single",
                         "prompt": f"prompt {p}", "mesh_path": "../glbs/cube.glb" if i == 0 else "../glbs/column.glb",
                         "status": "ok", "message": ""})
    rows[1].update(status="decode_error", message="bad token at 7", mesh_path="")
    rows[2].update(mesh_path="")
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent.parent / "glbs").mkdir(exist_ok=True)
    for f in ("cube.glb", "column.glb"):
        (path.parent.parent / "glbs" / f).write_bytes((glb_dir / f).read_bytes())
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_cli_samples_table_status_rows_and_copied_keys(glb_dir, tmp_path):
    samples_table(tmp_path / "gen" / "samples.parquet", glb_dir)
    r = run_cli("--samples", str(tmp_path / "gen" / "samples.parquet"), "--out", str(tmp_path / "r"),
                "--resolution", "48", "--views", "2", "--workers", "1")
    assert r.exit_code == 0, r.output
    t = {(x["sample_id"], x["view"]): x for x in read_table(tmp_path / "r", "renders").to_pylist()}
    assert len(t) == 16
    assert t[("p0-1-single", 0)]["status"] == "decode_error" and "bad token at 7" in t[("p0-1-single", 0)]["message"]
    assert t[("p1-0-single", 1)]["status"] == "render_error" and "mesh_path" in t[("p1-0-single", 1)]["message"]
    good = t[("p3-1-single", 1)]
    assert good["status"] == "ok" and good["prompt_id"] == "p3" and good["sample_index"] == 1 and good["level"] == "single"
    assert good["azimuth"] == pytest.approx(210.0) and good["elevation"] == pytest.approx(20.0)


def test_cli_shard_union_equals_unsharded(glb_dir, tmp_path):
    samples_table(tmp_path / "gen" / "samples.parquet", glb_dir)
    src = str(tmp_path / "gen" / "samples.parquet")
    common = ["--samples", src, "--resolution", "32", "--views", "2", "--no-sheet"]
    assert run_cli(*common, "--out", str(tmp_path / "full"), "--workers", "2").exit_code == 0
    for i in range(2):
        assert run_cli(*common, "--out", str(tmp_path / "sharded"), "--shard", f"{i}/2", "--workers", "1").exit_code == 0

    def rows(d):
        keep = ("sample_id", "view", "status", "message", "prompt_id")
        out = {}
        for x in read_table(d, "renders").to_pylist():
            img = open(x["image_path"], "rb").read() if x["image_path"] else b""
            out[(x["sample_id"], x["view"])] = ({k: x[k] for k in keep}, img)
        return out

    full, sharded = rows(tmp_path / "full"), rows(tmp_path / "sharded")
    assert full == sharded and len(full) == 16
    parts = [pq.read_table(p).column("prompt_id").to_pylist() for p in sorted((tmp_path / "sharded").glob("part-*"))]
    assert not set(parts[0]) & set(parts[1])  # groups never straddle shards


def test_cli_bad_inputs(tmp_path):
    pq.write_table(pa.table({"sample_id": ["a"]}), tmp_path / "x.parquet")
    r = run_cli("--samples", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "r"))
    assert r.exit_code == 2 and "mesh_path" in r.output and "x.parquet" in r.output
    (tmp_path / "empty").mkdir()
    r = run_cli("--samples", str(tmp_path / "empty"), "--out", str(tmp_path / "r2"))
    assert r.exit_code == 2
    pq.write_table(pa.table({"sample_id": ["a", "a"], "mesh_path": ["a.glb", "b.glb"]}), tmp_path / "d.parquet")
    r = run_cli("--samples", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "r4"))
    assert r.exit_code == 2 and "row 1: duplicate sample_id" in r.output
    pq.write_table(pa.table({"sample_id": ["a"], "mesh_path": ["a.glb"]}), tmp_path / "y.parquet")
    r = run_cli("--samples", str(tmp_path / "y.parquet"), "--out", str(tmp_path / "r3"), "--background", "zzz")
    assert r.exit_code == 2 and "--background" in r.output
    r = run_cli("--samples", str(tmp_path / "y.parquet"), "--out", str(tmp_path / "r5"), "--supersample", "0")
    assert r.exit_code == 2 and "--supersample" in r.output


# ---- torch backend ----------------------------------------------------------------------------

def small_object():
    """A few hundred triangles: a red block, a blue post on it, a yellow cube apart."""
    return grid_to_mesh(grid_with(((10, 16, 0, 4, 10, 18), "red"), ((12, 14, 4, 12, 12, 14), "blue"),
                                  ((20, 23, 0, 3, 20, 23), "yellow")))


@pytest.mark.parametrize("framing", ["object", "cube"])
def test_torch_backend_matches_open3d(framing):
    az, el = view_angles(4)
    ref = render_views(small_object(), az, el, 64, framing=framing, backend="open3d")
    out = render_views(small_object(), az, el, 64, framing=framing, backend="torch", device="cpu")
    assert set(out) == set(ref) and all(out[k].shape == ref[k].shape and out[k].dtype == ref[k].dtype for k in out)
    assert (out["mask"] == ref["mask"]).mean() >= 0.995 and 0.01 < ref["mask"].mean() < 0.8
    both = out["mask"] & ref["mask"]
    same_face = np.all(out["normal"] == ref["normal"], -1)[both]  # same face (or a coplanar neighbour)
    assert same_face.mean() >= 0.995
    assert np.abs(out["rgb"].astype(int) - ref["rgb"]).mean() < 1.0
    assert np.allclose(out["depth"][both], ref["depth"][both], rtol=1e-4, atol=1e-5)


def test_torch_primitive_ids_match_open3d_and_are_deterministic():
    v, f, _ = mesh_arrays(small_object())
    az, el = view_angles(3)
    rays = np.array(cached_cameras(tuple(map(float, az)), tuple(map(float, el)), 48, 40.0)[1])
    rays[..., :3] *= 0.5  # closer cameras: the object fills the frame
    t_ref, id_ref = open3d_engine.cast_rays(v, f, rays.astype(np.float32))
    t, ids = torch_engine.cast_rays(v, f, rays.astype(np.float32), "cpu")
    t2, ids2 = torch_engine.cast_rays(v, f, rays.astype(np.float32), "cpu", max_elements=4096)  # many small batches
    assert np.array_equal(ids, ids2) and np.array_equal(t, t2)
    assert ids.dtype == np.uint32 and (ids == id_ref).mean() >= 0.995
    hit = ids != 0xFFFFFFFF
    assert np.isinf(t[~hit]).all() and np.allclose(t[hit & (ids == id_ref)], t_ref[hit & (ids == id_ref)], rtol=1e-5)


def test_torch_cast_ties_lowest_id_and_per_ray_origins():
    tri = np.array([[-1, -1, 0], [1, -1, 0], [0, 1, 0]], np.float32)
    verts = np.concatenate([tri + [0, 0, -1], tri, tri])  # triangle 0 behind (z=-1), 1 and 2 coincide at z=0
    faces = np.arange(9, dtype=np.uint32).reshape(3, 3)
    # 1 view, 1 x 3 rays from different origins looking down -z: hit, hit (direction length 2), miss
    rays = np.array([[[[0, 0, 5, 0, 0, -1], [0.2, 0.1, 3, 0, 0, -2], [5, 5, 5, 0, 0, -1]]]], np.float32)
    t, ids = torch_engine.cast_rays(verts, faces, rays, "cpu")
    assert ids.tolist() == [[[1, 1, 0xFFFFFFFF]]]  # the nearer of 0 / {1, 2}; the tie goes to the lowest id
    assert t[0, 0, :2] == pytest.approx([5.0, 1.5]) and np.isinf(t[0, 0, 2])


def test_backend_choice_and_no_open3d_import(monkeypatch):
    import subprocess
    import sys

    from rl3d.formats.errors import InputError

    code = "import sys, rl3d.stages.render; assert 'open3d' not in sys.modules, 'open3d imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    assert engines.resolve_backend("auto") == "open3d" and pick_device(None) == "cpu"
    monkeypatch.setattr(engines, "open3d_available", lambda: False)  # as on the GPU machine
    assert engines.resolve_backend("auto") == "torch"
    with pytest.raises(InputError, match="open3d is not installed"):
        engines.resolve_backend("open3d")
    with pytest.raises(InputError, match="--backend"):
        engines.resolve_backend("embree")
    with pytest.raises(InputError, match="--device"):
        pick_device("tpu:0")


def test_cli_torch_backend_writes_same_images(glb_dir, tmp_path):
    r = run_cli("--samples", str(glb_dir), "--out", str(tmp_path / "t"), "--resolution", "32", "--views", "2",
                "--backend", "torch", "--device", "cpu", "--depth", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["meshes"] == 3 and summary["failed_meshes"] == 1 and summary["rows"] == 6
    t = read_table(tmp_path / "t", "renders").to_pylist()
    assert [x["sample_id"] for x in t] == ["broken"] * 2 + ["column"] * 2 + ["cube"] * 2  # input order kept
    cube = [x for x in t if x["sample_id"] == "cube"]
    az, el = view_angles(2)
    expect = render_views(red_cube(), az, el, 32, backend="torch", device="cpu", supersample=2)["rgb"]  # the default
    for x in cube:
        assert x["status"] == "ok" and np.array_equal(np.asarray(Image.open(x["image_path"])), expect[x["view"]])
        assert Image.open(x["depth_path"]).size == (32, 32)
    r = run_cli("--samples", str(glb_dir), "--out", str(tmp_path / "t2"), "--backend", "torch", "--device", "tpu")
    assert r.exit_code == 2 and "--device" in r.output


# ---- anti-aliasing (supersampling) --------------------------------------------------------------

def neighbourhoods(a):
    """The 3x3 neighbours of every pixel of [V, H, W, ...] (edges repeated): [9, V, H, W, ...]."""
    pad = np.pad(a, [(0, 0), (1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 3), mode="edge")
    h, w = a.shape[1:3]
    return np.stack([pad[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def test_supersample_blends_silhouette_edges_and_keeps_flat_areas():
    az, el = view_angles(3)
    one = render_views(red_cube(), az, el, 64)
    two = render_views(red_cube(), az, el, 64, supersample=2)
    assert all(two[k].shape == one[k].shape and two[k].dtype == one[k].dtype for k in one)
    rgb1, rgb2 = one["rgb"].astype(int), two["rgb"].astype(int)
    near = neighbourhoods(rgb1)
    # a pixel whose 3x3 neighbourhood shows one colour at K=1 (one face of the cube, or the
    # background) is the same at K=2: all its sub-pixel rays see what its centre sees
    flat = (near == rgb1).all(-1).all(0)
    assert flat.mean() > 0.5
    assert np.array_equal(rgb2[flat], rgb1[flat]) and np.array_equal(two["mask"][flat], one["mask"][flat])
    # (the mean z-depth of a pixel's sub-samples is close to its centre's: z is not linear on screen)
    assert np.allclose(two["depth"][flat & one["mask"]], one["depth"][flat & one["mask"]], rtol=1e-3)
    # silhouette pixels (object and background meet in the 3x3 neighbourhood) get blended values
    # between their neighbours' colours, not in the aliased image's palette
    masks = neighbourhoods(one["mask"])
    silhouette = masks.any(0) & ~masks.all(0)
    blended = np.zeros(rgb2.shape[:3], bool)
    for v in range(len(az)):
        palette = {tuple(c) for c in rgb1[v].reshape(-1, 3)}
        assert len(palette) <= 4  # background + at most three visible sides: K=1 is aliased
        blended[v] = np.array([tuple(c) not in palette for c in rgb2[v].reshape(-1, 3)]).reshape(rgb2.shape[1:3])
    # (about one pixel in four: the band is 2 px wide and a K=2 pixel blends when the edge passes
    # between its sub-samples)
    assert silhouette.sum() > 100 and blended[silhouette].mean() > 0.15 and not blended[flat].any()
    assert ((rgb2 >= near.min(0)) & (rgb2 <= near.max(0)))[silhouette].all()
    # the resolved mask, depth and normals stay consistent
    m = two["mask"]
    assert (two["depth"][m] > 0).all() and (two["depth"][~m] == 0).all()
    assert np.allclose(np.linalg.norm(two["normal"][m], axis=-1), 1, atol=1e-4) and (two["normal"][~m] == 0).all()
    assert (m != one["mask"]).sum() < 0.5 * silhouette.sum()  # the mask moves only at the silhouette


def test_cli_supersample_1_is_the_one_ray_renderer(glb_dir, tmp_path):
    az, el = view_angles(2)
    for k in (1, 2):
        out = tmp_path / f"k{k}"
        r = run_cli("--samples", str(glb_dir), "--out", str(out), "--resolution", "32", "--views", "2",
                    "--supersample", str(k), "--no-sheet", "--workers", "1")
        assert r.exit_code == 0, r.output
        expect = render_views(red_cube(), az, el, 32, supersample=k)["rgb"]
        cube = [x for x in read_table(out, "renders").to_pylist() if x["sample_id"] == "cube"]
        for x in cube:
            assert np.array_equal(np.asarray(Image.open(x["image_path"])), expect[x["view"]])
        config = json.loads((out / "_manifest.json").read_text())["config"]
        # K=1 leaves the config as it was before supersampling existed (old output dirs resume)
        assert ("supersample" in config) == (k > 1)
