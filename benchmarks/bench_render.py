"""Render throughput: views/s of a ~50k-triangle flat-coloured mesh, per ray-casting backend.

Compares, in the same run:
- open3d (when installed): rl3d's batched renderer (all views of a mesh in one cast_rays call,
  look-up-table shading) against rendering one view at a time with the same code (one BVH
  build and one cast_rays call per view), the baseline;
- torch (always): the same batched render_views with the PyTorch ray caster on --device
  (default cuda when available, else cpu), printed beside open3d with the device name;
- anti-aliasing: the batched render with --supersample K (K x K rays per pixel, the render
  command's default 2) against one ray per pixel, as a cost ratio (open3d; torch on CUDA only,
  the torch engine on CPU being for tests).
The test mesh is built with trimesh alone (open3d is absent on the GPU machine). Goal on the
2-core dev box (open3d): >= 20 views/s at 512^2.

    python benchmarks/bench_render.py [--views 6] [--repeats 3] [--resolution 512]
        [--device cuda] [--torch-resolution 256] [--supersample 2]   # CPU torch is slow: default 128^2 there
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def test_mesh(count: int = 112):
    """A lumpy sphere (a displaced UV sphere, ~50k triangles) flat-coloured in 6 palette bands by
    height, built with trimesh only."""
    import trimesh

    from rl3d.formats.voxels import PALETTE_RGB

    sphere = trimesh.creation.uv_sphere(radius=0.38, count=[count, count])
    v = np.asarray(sphere.vertices)
    x, y, z = v.T
    v = v * (1 + 0.13 * np.sin(9 * x) * np.cos(7 * y) * np.sin(8 * z))[:, None]
    centre_y = v[sphere.faces].mean(1)[:, 1]
    band = np.clip(((centre_y + 0.5) * 6).astype(int), 0, 15)
    rgba = np.concatenate([np.asarray(PALETTE_RGB, np.uint8)[band], np.full((len(band), 1), 255, np.uint8)], 1)
    return trimesh.Trimesh(vertices=v, faces=sphere.faces, face_colors=rgba, process=False)


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def timed_pair(fa, fb, repeats: int) -> tuple[float, float]:
    """Best times of fa and fb run alternately, so a load change on a shared machine hits both."""
    best_a = best_b = float("inf")
    for _ in range(repeats):
        best_a = min(best_a, timed(fa, 1))
        best_b = min(best_b, timed(fb, 1))
    return best_a, best_b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--device", default=None, help="torch backend device [cuda when available, else cpu]")
    ap.add_argument("--torch-resolution", type=int, default=None,
                    help="resolution for the torch backend [--resolution on cuda, 128 on cpu]")
    ap.add_argument("--supersample", type=int, default=2,
                    help="also time K x K rays per pixel against one ray per pixel (1: skip) [2]")
    a = ap.parse_args()

    import torch

    from rl3d.stages.raycast.cameras import view_angles
    from rl3d.stages.raycast.engines import open3d_available
    from rl3d.stages.raycast.renderer import render_views
    from rl3d.stages.policy.device import pick_device

    mesh = test_mesh()
    az, el = view_angles(a.views)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"mesh {len(mesh.faces)} triangles; {a.views} views; best of {a.repeats}")
    if open3d_available():
        render_views(mesh, az[:1], el[:1], 64, backend="open3d")  # warm up imports / thread pools
        batched = timed(lambda: render_views(mesh, az, el, a.resolution, with_normals=False, backend="open3d"), a.repeats)
        one_by_one = timed(lambda: [render_views(mesh, az[i:i + 1], el[i:i + 1], a.resolution, with_normals=False,
                                                 backend="open3d") for i in range(len(az))], a.repeats)
        out = render_views(mesh, az, el, a.resolution, backend="open3d")
        print(f"foreground fraction {out['mask'].mean():.3f}")
        print(f"open3d one view at a time ({a.resolution}^2): {a.views / one_by_one:7.1f} views/s "
              f"({1000 * one_by_one / a.views:.1f} ms/view)")
        print(f"open3d batched (rl3d)     ({a.resolution}^2): {a.views / batched:7.1f} views/s "
              f"({1000 * batched / a.views:.1f} ms/view)   speed-up {one_by_one / batched:.2f}x")
        if a.supersample > 1:
            one, aa = timed_pair(lambda: render_views(mesh, az, el, a.resolution, with_normals=False, backend="open3d"),
                                 lambda: render_views(mesh, az, el, a.resolution, with_normals=False, backend="open3d",
                                                      supersample=a.supersample), a.repeats)
            print(f"open3d batched supersample {a.supersample} ({a.resolution}^2): {a.views / aa:7.1f} views/s "
                  f"({1000 * aa / a.views:.1f} ms/view)   cost {aa / one:.2f}x supersample 1 "
                  f"({1000 * one / a.views:.1f} ms/view, timed alternately)")
    else:
        batched = None
        print("open3d: not installed here")

    device = pick_device(a.device)
    res = a.torch_resolution or (a.resolution if device.startswith("cuda") else 128)
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else \
        f"cpu, {torch.get_num_threads()} threads"

    def run_torch():
        render_views(mesh, az, el, res, with_normals=False, backend="torch", device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run_torch()  # warm up: CUDA context, kernels, cached ray tiles
    secs = timed(run_torch, a.repeats)
    print(f"torch batched on {device} ({name}) ({res}^2): {a.views / secs:7.1f} views/s "
          f"({1000 * secs / a.views:.1f} ms/view)")
    if a.supersample > 1 and device.startswith("cuda"):
        def run_torch_aa():
            render_views(mesh, az, el, res, with_normals=False, backend="torch", device=device, supersample=a.supersample)
            torch.cuda.synchronize()

        run_torch_aa()  # warm up: the supersampled ray tiles
        one, aa = timed_pair(run_torch, run_torch_aa, a.repeats)
        print(f"torch batched supersample {a.supersample} ({res}^2): {a.views / aa:7.1f} views/s "
              f"({1000 * aa / a.views:.1f} ms/view)   cost {aa / one:.2f}x supersample 1")
    if batched is not None:
        # per-pixel cost ratio, so different resolutions still compare
        ratio = (batched / a.resolution ** 2) / (secs / res ** 2)
        print(f"torch vs open3d batched (per pixel): {ratio:.3f}x")


if __name__ == "__main__":
    main()
