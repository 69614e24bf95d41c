"""Geometry reward terms on hand-built grids with known answers."""
import numpy as np
import pytest

from rl3d.stages.rewards import geometry as g
from rl3d.stages.rewards.base import RewardItem


def box(grid, x0, x1, y0, y1, z0, z1, c=1):
    grid[x0:x1, y0:y1, z0:z1] = c
    return grid


def empty():
    return np.zeros((32, 32, 32), np.uint8)


def chair():
    """A left-right symmetric chair standing on the ground: 4 legs, seat, back."""
    c = empty()
    for x in (10, 20):
        for z in (10, 20):
            box(c, x, x + 2, 0, 8, z, z + 2)
    box(c, 10, 22, 8, 10, 10, 22, 2)
    box(c, 10, 22, 10, 20, 10, 12, 3)
    return c


def test_solid_cube_is_perfect():
    c = box(empty(), 8, 16, 0, 8, 8, 16)
    occ = c > 0
    for name, fn in g.GEOMETRY_METRICS.items():
        assert fn(occ)[0] == pytest.approx(1.0), name


def test_floating_cube_counts_as_floating_part():
    c = box(empty(), 8, 16, 0, 8, 8, 16)
    box(c, 20, 23, 20, 23, 20, 23)  # hovering, not touching ground or body
    v, d = g.floating_parts(c > 0)
    assert d["floating"] == 1 and v == pytest.approx(0.5)
    assert g.largest_component(c > 0)[0] == pytest.approx(512 / (512 + 27))
    # a second grounded piece beside the body is not floating
    box(c, 0, 2, 0, 2, 0, 2)
    assert g.floating_parts(c > 0)[1]["floating"] == 1


def test_hovering_object_loses_ground_contact():
    c = box(empty(), 8, 16, 3, 8, 8, 16)
    assert g.ground_contact(c > 0) == (pytest.approx(0.25), {"gap_layers": 3})


def test_tipping_tower_is_unstable_and_upright_tower_is_stable():
    upright = box(empty(), 14, 16, 0, 20, 14, 16)
    assert g.stability(upright > 0)[0] == 1.0
    tower = empty()
    for y in range(20):  # leans +x by one voxel per layer: centre of mass far past the base
        box(tower, 2 + y, 4 + y, y, y + 1, 14, 16)
    v, d = g.stability(tower > 0)
    assert v == 0.0 and d["outside_by"] > 4


def test_symmetric_chair_has_symmetry_one():
    c = chair()
    assert g.symmetry(c > 0)[0] == 1.0
    box(c, 22, 26, 0, 4, 10, 12)  # an extra block on one side only
    assert g.symmetry(c > 0)[0] < 0.9


def test_watertight_detects_edge_only_contact():
    c = box(empty(), 4, 6, 0, 2, 4, 6)
    assert g.watertight(c > 0)[0] == 1.0
    c[6, 2, 4] = 1  # touches the cube only along an edge -> non-manifold edge
    v, d = g.watertight(c > 0)
    assert v < 1.0 and d["non_manifold_edges"] >= 1


def test_watertight_matches_trimesh_on_merged_mesh():
    from rl3d.formats.voxels import grid_to_mesh

    c = chair()
    assert (g.watertight(c > 0)[0] == 1.0) == grid_to_mesh(c, merge=True).is_watertight


def test_degenerate_shapes():
    assert g.non_degenerate(empty() > 0)[0] == 0.0
    stick = box(empty(), 5, 6, 0, 20, 5, 6)
    assert g.non_degenerate(stick > 0)[0] == 0.0
    assert g.non_degenerate(chair() > 0)[0] == 1.0


def test_backend_empty_grid_is_a_status_not_a_number():
    b = g.GeometryBackend(metric="stability")
    r = b.score([RewardItem("s", "p", "fine", [], grid=empty()), RewardItem("t", "p", "fine", [], grid=chair())])
    assert r[0].status == "empty_mesh" and r[0].value is None
    assert r[1].status == "ok" and r[1].value == 1.0
    nd = g.GeometryBackend(metric="non_degenerate").score([RewardItem("s", "p", "fine", [], grid=empty())])[0]
    assert nd.status == "ok" and nd.value == 0.0


def test_backend_voxelises_glb_when_no_grid(tmp_path):
    from rl3d.formats.glb import write_glb
    from rl3d.formats.voxels import grid_to_mesh

    path = write_glb(grid_to_mesh(chair()), tmp_path / "chair.glb")
    r = g.GeometryBackend(metric="symmetry").score([RewardItem("s", "p", "fine", [], mesh_path=str(path))])[0]
    assert r.status == "ok" and r.value > 0.9
    occ = g.grid_from_glb(str(path)) > 0
    from rl3d.formats.voxels import voxel_iou
    assert voxel_iou(occ, chair() > 0) > 0.8


def test_bad_metric_options_fail_at_construction():
    from rl3d.formats.errors import InputError

    with pytest.raises(InputError, match="unknown geometry metric"):
        g.GeometryBackend(metric="beauty")
    with pytest.raises(InputError, match="bad options"):
        g.GeometryBackend(metric="stability", tolerence=2)
