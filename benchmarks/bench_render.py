"""Render throughput: views/s at 512^2 of a ~50k-triangle flat-coloured mesh.

Compares, in the same run, rl3d's batched renderer (all views of a mesh in one cast_rays call,
look-up-table shading) against rendering one view at a time with the same code (one BVH build
and one cast_rays call per view). Prints the machine's core count; the goal on the 2-core dev
box is >= 20 views/s.

    /work/venv/bin/python benchmarks/bench_render.py [--views 6] [--repeats 3] [--resolution 512]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def test_mesh(target_faces: int = 50_000):
    """A smooth isosurface of a lumpy sphere, flat-coloured in palette bands (~50k triangles)."""
    from rl3d.formats.voxels import grid_to_mesh

    r = 96
    c = (np.arange(r) + 0.5) / r - 0.5
    x, y, z = np.meshgrid(c, c, c, indexing="ij")
    rad = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    lumpy = 0.38 + 0.05 * np.sin(7 * x) * np.cos(5 * y) * np.sin(6 * z)
    band = np.clip(((y + 0.5) * 6).astype(np.uint8) + 1, 1, 16)
    grid = np.where(rad < lumpy, band, 0).astype(np.uint8)
    return grid_to_mesh(grid, smooth=True)


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=512)
    a = ap.parse_args()

    from rl3d.stages.render import render_views, view_angles

    mesh = test_mesh()
    az, el = view_angles(a.views)
    render_views(mesh, az[:1], el[:1], 64)  # warm up imports / thread pools

    batched = timed(lambda: render_views(mesh, az, el, a.resolution, with_normals=False), a.repeats)
    one_by_one = timed(lambda: [render_views(mesh, az[i:i + 1], el[i:i + 1], a.resolution, with_normals=False)
                                for i in range(len(az))], a.repeats)
    out = render_views(mesh, az, el, a.resolution)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"mesh {len(mesh.faces)} triangles; {a.views} views at {a.resolution}^2; best of {a.repeats}")
    print(f"foreground fraction {out['mask'].mean():.3f}")
    print(f"one view at a time : {a.views / one_by_one:7.1f} views/s ({1000 * one_by_one / a.views:.1f} ms/view)")
    print(f"batched (rl3d)     : {a.views / batched:7.1f} views/s ({1000 * batched / a.views:.1f} ms/view)")
    print(f"speed-up           : {one_by_one / batched:.2f}x")


if __name__ == "__main__":
    main()
