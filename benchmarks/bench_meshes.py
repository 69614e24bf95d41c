"""The CPU cost of a sample's mesh file, old way against new, in one run: gen's write of each decoded
grid (formats/voxels.grid_to_mesh, then formats/glb.write_glb) with the mesh unmerged to 3 vertices a
face (before) and with each cube face's own 4 vertices (now), and render's read of each file back.
One process, one core; the meshes are synth objects decoded by the shipped codec.

    python benchmarks/bench_meshes.py [--n 64]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from rl3d.formats.glb import flat_vertex_mesh, read_glb, unmerged_mesh
from rl3d.formats.shards import atomic_path
from rl3d.formats.voxels import grid_to_mesh


def grids(n: int) -> list[np.ndarray]:
    from rl3d.formats.codec import VoxelCodec
    from rl3d.stages.shapes.world import generate_objects

    codec = VoxelCodec.load()
    objs = generate_objects(n, seed=11, split="train")
    return list(codec.decode_batch(codec.encode_batch(np.stack([o.grid for o in objs])).astype(np.int32)))


def write(grid: np.ndarray, path: Path, own_vertices: bool) -> None:
    mesh = grid_to_mesh(grid)
    written = flat_vertex_mesh(mesh) if own_vertices else unmerged_mesh(mesh)
    assert written is not None
    with atomic_path(path) as tmp:
        written.export(tmp, file_type="glb", include_normals=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="meshes")
    ap.add_argument("--repeat", type=int, default=3, help="passes (best is kept)")
    a = ap.parse_args()
    gs = grids(a.n)
    root = Path(tempfile.mkdtemp(prefix="bench-meshes-"))
    res = {}
    for name, own in (("unmerged (before)", False), ("own vertices (now)", True)):
        best_w = best_r = float("inf")
        for rep in range(a.repeat):
            paths = [root / f"{own:d}-{rep}-{i}.glb" for i in range(len(gs))]
            t0 = time.perf_counter()
            for g, p in zip(gs, paths):
                write(g, p, own)
            t1 = time.perf_counter()
            for p in paths:
                read_glb(p)
            t2 = time.perf_counter()
            best_w, best_r = min(best_w, (t1 - t0) / len(gs)), min(best_r, (t2 - t1) / len(gs))
        size = np.mean([p.stat().st_size for p in paths]) / 1e3
        res[name] = (best_w, best_r)
        print(f"{name:20s} write {best_w * 1e3:6.1f} ms  read {best_r * 1e3:6.1f} ms a mesh  {size:6.0f} kB")
    (bw, br), (nw, nr) = res.values()
    print(f"ratio before / now: write {bw / nw:.2f}x, read {br / nr:.2f}x")


if __name__ == "__main__":
    main()
