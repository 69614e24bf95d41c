"""64^3 occupancy grids of the ShapeLLM-Omni codec: frames, mesh -> voxels, voxels -> mesh.

Two frames meet here:
- rl3d's frame (formats/voxels.py): grid[x, y, z], glTF axes, +Y up, +Z front, the unit cube
  [-0.5, 0.5]^3 in metres; voxel (i, j, k) centred at (i + 0.5) / 64 - 0.5 on each axis.
- the VQ-VAE's frame (TRELLIS): +Z up. The authors voxelise a mesh in its own (Y-up) frame and
  rotate the voxel centres +90 degrees about x, p -> R p with R = [[1,0,0],[0,0,-1],[0,1,0]],
  i.e. (x, y, z) -> (x, -z, y): up (+Y) becomes +Z, front (+Z) becomes -Y. TRELLIS turns its
  output back with the inverse, (x, y, z) -> (x, z, -y) ("z-up to y-up" in its GLB export).
  On voxel indices: vq[i, 63 - k, j] = grid[i, j, k].
"""
from __future__ import annotations

import numpy as np
from rl3d.formats.glb import write_glb
from rl3d.formats.voxels import grid_to_faces

RESOLUTION = 64
NEUTRAL_RGBA = (200, 200, 200, 255)  # untextured meshes: light grey, matte, not metallic

# +90 degrees about x (the authors' rotate_points(axis='x', angle_deg=90)); applied as R @ p.
ROT_X_90 = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def gltf_to_vq_points(points: np.ndarray) -> np.ndarray:
    """(N, 3) points in rl3d/glTF axes -> the VQ-VAE's Z-up axes: (x, y, z) -> (x, -z, y)."""
    return np.asarray(points) @ ROT_X_90.T


def vq_to_gltf_points(points: np.ndarray) -> np.ndarray:
    """Inverse of gltf_to_vq_points: (x, y, z) -> (x, z, -y)."""
    return np.asarray(points) @ ROT_X_90


def gltf_to_vq_frame(grids: np.ndarray) -> np.ndarray:
    """Grid(s) [..., R, R, R] in rl3d's frame -> the VQ-VAE's frame: out[i, R-1-k, j] = in[i, j, k]."""
    return np.flip(np.asarray(grids), -1).swapaxes(-1, -2)


def vq_to_gltf_frame(grids: np.ndarray) -> np.ndarray:
    """Inverse of gltf_to_vq_frame: out[i, j, k] = in[i, R-1-k, j]."""
    return np.flip(np.asarray(grids).swapaxes(-1, -2), -1)


# ---- mesh -> voxels (the authors' convention) -------------------------------------------------

def normalise_vertices(vertices: np.ndarray) -> np.ndarray:
    """The authors' normalisation: one scalar min / max over all coordinates maps the mesh into
    [-0.5, 0.5]^3 (aspect kept; the mesh touches -0.5 on the axis holding the smallest coordinate,
    so it is centred only when its bounds are symmetric), then clipped just inside the cube."""
    v = np.asarray(vertices, np.float64)
    lo, hi = v.min(), v.max()
    v = (v - lo) / max(hi - lo, 1e-12) - 0.5
    return np.clip(v, -0.5 + 1e-6, 0.5 - 1e-6)


def voxelise_mesh(mesh, resolution: int = RESOLUTION) -> np.ndarray:
    """A trimesh (or (vertices, faces)) -> uint8[R, R, R] surface occupancy in the mesh's own frame
    (rl3d's frame for a glTF mesh): normalise_vertices, then open3d's
    VoxelGrid.create_from_triangle_mesh_within_bounds at 1/R over [-0.5, 0.5]^3, as the authors do."""
    import open3d as o3d  # heavy optional dependency, kept lazy on purpose

    vertices, faces = (mesh.vertices, mesh.faces) if hasattr(mesh, "vertices") else mesh
    o3m = o3d.geometry.TriangleMesh()
    o3m.vertices = o3d.utility.Vector3dVector(normalise_vertices(vertices))
    o3m.triangles = o3d.utility.Vector3iVector(np.asarray(faces, np.int32))
    vg = o3d.geometry.VoxelGrid.create_from_triangle_mesh_within_bounds(
        o3m, voxel_size=1.0 / resolution, min_bound=np.full((3, 1), -0.5), max_bound=np.full((3, 1), 0.5))
    idx = np.array([v.grid_index for v in vg.get_voxels()], np.int64).reshape(-1, 3)
    grid = np.zeros((resolution,) * 3, np.uint8)
    idx = idx[((idx >= 0) & (idx < resolution)).all(1)]
    grid[tuple(idx.T)] = 1
    return grid


def mesh_to_vq_occupancy(mesh, resolution: int = RESOLUTION) -> np.ndarray:
    """The grid the authors feed their VQ-VAE for a mesh file: voxelise_mesh, rotated +90 degrees
    about x into the VQ-VAE's frame (uint8[R, R, R], axes x, y, z, +Z up)."""
    return np.ascontiguousarray(gltf_to_vq_frame(voxelise_mesh(mesh, resolution)))


# ---- voxels -> mesh ---------------------------------------------------------------------------

def occupancy_to_mesh(grid: np.ndarray):
    """uint8/bool[R, R, R] occupancy in rl3d's frame -> trimesh.Trimesh of the exposed cube faces:
    welded vertices, metres, +Y up, a neutral matte material (no texture)."""
    import trimesh


    v, f, _ = grid_to_faces((np.asarray(grid) > 0).astype(np.uint8))
    mesh = trimesh.Trimesh(vertices=v, faces=f, process=True)  # weld shared cube corners
    material = trimesh.visual.material.PBRMaterial(baseColorFactor=NEUTRAL_RGBA, metallicFactor=0.0,
                                                   roughnessFactor=1.0)
    mesh.visual = trimesh.visual.TextureVisuals(material=material)
    return mesh


def write_occupancy_glb(grid: np.ndarray, path, metadata: dict | None = None):
    """occupancy_to_mesh written as GLB (formats.glb.write_glb: atomic, glTF Y-up)."""

    return write_glb(occupancy_to_mesh(grid), path, metadata)
