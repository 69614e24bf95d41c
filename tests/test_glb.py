"""tokens -> voxels -> mesh -> GLB: exact colours, orientation, watertightness, bad files."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from rl3d.formats.codec import VoxelCodec
from rl3d.formats.glb import face_rgb, read_glb, write_glb
from rl3d.formats.voxels import PALETTE_RGB, color_id, grid_to_mesh


def house() -> np.ndarray:
    g = np.zeros((32, 32, 32), np.uint8)
    g[6:26, 0:4, 6:26] = color_id("gray")     # ground slab
    g[8:24, 4:18, 8:24] = color_id("red")     # walls
    g[10:22, 18:24, 10:22] = color_id("blue")  # roof block
    g[14:18, 4:10, 24:26] = color_id("brown")  # door on the front (+Z) side
    return g


def centroid_colours(mesh) -> dict:
    c = np.round(np.asarray(mesh.triangles_center) * 64).astype(int)
    return {tuple(k): tuple(v) for k, v in zip(c, face_rgb(mesh))}


def test_glb_roundtrip_keeps_face_colours_exactly(tmp_path):
    mesh = grid_to_mesh(house())
    before = centroid_colours(mesh)
    write_glb(mesh, tmp_path / "h.glb")
    back = read_glb(tmp_path / "h.glb")
    assert len(back.faces) == len(mesh.faces)
    assert centroid_colours(back) == before
    palette = {tuple(c) for c in PALETTE_RGB}
    assert set(before.values()) <= palette and len(set(before.values())) == 4


def test_voxel_mesh_written_without_unmerging_equals_the_unmerged_file(tmp_path):
    """A voxel mesh (each cube face owns its 4 vertices) is written with its own vertices, 4 a quad;
    a mesh whose shared vertices join faces of two colours is unmerged (3 a face). Both read back
    with the same triangles, face colours and flat normals as the mesh."""
    import trimesh

    mesh = grid_to_mesh(house())
    write_glb(mesh, tmp_path / "own.glb")
    own = read_glb(tmp_path / "own.glb")
    assert len(own.vertices) == len(mesh.vertices) == 2 * len(mesh.faces)
    # the same mesh welded: its vertices join faces of other colours and normals, so it is unmerged
    welded = trimesh.Trimesh(mesh.vertices, mesh.faces, face_colors=mesh.visual.face_colors, process=True)
    assert len(welded.vertices) < len(mesh.vertices)
    write_glb(welded, tmp_path / "welded.glb")
    unmerged = read_glb(tmp_path / "welded.glb")
    assert len(unmerged.vertices) == 3 * len(unmerged.faces)

    def keyed(m):
        tri = np.round(np.asarray(m.triangles).reshape(len(m.faces), 9), 6)
        return sorted(zip(map(tuple, tri.tolist()), map(tuple, face_rgb(m).tolist())))

    assert keyed(own) == keyed(unmerged) == keyed(mesh)
    for m in (own, unmerged):  # each vertex's normal is its face's: flat shading in any viewer
        assert np.allclose(np.asarray(m.vertex_normals)[m.faces], np.asarray(m.face_normals)[:, None], atol=1e-6)


def test_glb_orientation_y_up_z_front(tmp_path):
    g = np.zeros((32, 32, 32), np.uint8)
    g[15, 30, 15] = color_id("yellow")  # high y
    g[15, 0, 15] = color_id("green")    # ground
    g[15, 10, 31] = color_id("red")     # front (+z)
    g[31, 10, 15] = color_id("blue")    # +x
    write_glb(grid_to_mesh(g), tmp_path / "o.glb")
    back = read_glb(tmp_path / "o.glb")
    rgb, centres = face_rgb(back), np.asarray(back.triangles_center)

    def where(name):
        return centres[(rgb == PALETTE_RGB[color_id(name) - 1]).all(1)].mean(0)

    assert where("yellow")[1] > 0.4 and where("green")[1] < -0.4  # Y up, ground at y = -0.5
    assert where("red")[2] > 0.4 and where("blue")[0] > 0.4        # +Z front, +X
    assert back.bounds[0][1] == pytest.approx(-0.5)
    # the glTF scene itself carries no rotation: node transforms are identity or absent
    data = (tmp_path / "o.glb").read_bytes()
    (jlen,) = struct.unpack("<I", data[12:16])
    gltf = json.loads(data[20:20 + jlen])
    for node in gltf.get("nodes", []):
        assert "rotation" not in node and node.get("matrix", np.eye(4).ravel().tolist()) == np.eye(4).ravel().tolist()


def test_merged_mesh_is_watertight_with_voxel_volume():
    g = house()
    m = grid_to_mesh(g, merge=True)
    assert m.is_watertight and m.is_winding_consistent
    assert m.volume == pytest.approx((g > 0).sum() / 32 ** 3)


def test_smooth_isosurface_is_closed_and_palette_coloured(tmp_path):
    m = grid_to_mesh(house(), smooth=True)
    assert len(m.faces) > 100
    welded = m.copy()
    welded.merge_vertices()
    assert welded.is_watertight and welded.volume > 0  # outward-facing
    palette = {tuple(c) for c in PALETTE_RGB}
    assert {tuple(c) for c in face_rgb(m)} <= palette
    write_glb(m, tmp_path / "s.glb")
    assert len(read_glb(tmp_path / "s.glb").faces) == len(m.faces)


def test_tokens_to_glb_pipeline(tmp_path):
    codec = VoxelCodec.load()
    g = house()
    grid = codec.decode(codec.encode(g))
    write_glb(grid_to_mesh(grid), tmp_path / "t.glb", metadata={"sample_id": "x"})
    back = read_glb(tmp_path / "t.glb")
    assert len(back.faces) == len(grid_to_mesh(grid).faces)
    assert back.bounds[1][1] <= 0.5 + 1e-6


def test_bad_glb_files(tmp_path):
    (tmp_path / "junk.glb").write_bytes(b"not a glb at all")
    with pytest.raises(ValueError, match="junk.glb"):
        read_glb(tmp_path / "junk.glb")
    with pytest.raises(ValueError):
        read_glb(tmp_path / "missing.glb")
    import trimesh

    trimesh.Trimesh(vertices=np.zeros((3, 3)), faces=np.zeros((0, 3), int)).export(tmp_path / "empty.glb")
    with pytest.raises(ValueError, match="empty.glb"):
        read_glb(tmp_path / "empty.glb")
