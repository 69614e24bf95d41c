"""Render throughput (views/s) on our meshes: each variant against a baseline measured in the same run.

Meshes: `--meshes` synth objects of the shape world as the block codec's voxel meshes (what gen
writes: a few thousand flat-coloured triangles each). Variants, all `--views` views of every
mesh at `--resolution` with `--supersample` K x K rays per pixel (the render command's default 2):
- baseline: the torch ray caster one mesh at a time (cone-culled tiles, numpy shading: the
  renderer before batching) on --device;
- torch batched, all faces: torch_renderer.render_batch, many meshes per batch on --device, shading
  and anti-aliasing on the device (the same image bits as the baseline, checked here);
- torch batched: the same, skipping each closed mesh's faces turned away from the camera (the
  default; images compared with the all-faces ones here);
- on a GPU, two sizes of the same: 4x the meshes a batch (fewer host round trips) and 4x the
  (ray, triangle) pairs a caster step (fewer, larger kernels);
- open3d per mesh (when installed): Embree on the CPU, one mesh at a time;
- with --stage: the whole `rl3d render` command with the torch backend on a directory of GLBs
  (reading meshes, worker processes, PNG writing; no contact sheets), views/s end to end.
Goal on one H100/H200: >= 500 views/s at 512 px for the torch batched renderer.

    python benchmarks/bench_render.py                          # GPU: 64 meshes, 6 views, 512 px
    python benchmarks/bench_render.py --meshes 4 --resolution 48 --device cpu   # a small CPU check
    python benchmarks/bench_render.py --stage                   # also the render command end to end
    python benchmarks/bench_render.py --profile                 # and where one batched render's time goes
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def voxel_meshes(n: int, seed: int = 3) -> list:
    """Our meshes: the shape world's objects as block-codec voxel meshes (formats/voxels.py)."""
    from rl3d.formats.voxels import grid_to_mesh
    from rl3d.stages.shapes.world import generate_objects

    return [grid_to_mesh(o.grid) for o in generate_objects(n, seed=seed)]


def test_mesh(count: int = 112):
    """A lumpy sphere (a displaced UV sphere, ~50k triangles) flat-coloured in 6 palette bands by
    height, built with trimesh only (a dense slanted mesh, beside the voxel meshes)."""
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


def best_of(fn, repeats: int, sync) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    import torch

    from rl3d.stages.policy.device import pick_device

    ap = argparse.ArgumentParser()
    ap.add_argument("--meshes", type=int, default=None, help="[64 on cuda, 4 on cpu]")
    ap.add_argument("--views", type=int, default=6)
    ap.add_argument("--resolution", type=int, default=None, help="[512 on cuda, 48 on cpu]")
    ap.add_argument("--supersample", type=int, default=2)
    ap.add_argument("--device", default=None, help="torch device [cuda when available, else cpu]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sphere", action="store_true", help="render the ~50k-triangle lumpy sphere instead")
    ap.add_argument("--stage", action="store_true", help="also time the render command end to end")
    ap.add_argument("--profile", action="store_true",
                    help="print torch's profile of one batched render: its kernels (on a GPU) and host calls")
    a = ap.parse_args()

    from rl3d.stages.raycast import torch_renderer
    from rl3d.stages.raycast.cameras import view_angles
    from rl3d.stages.raycast.engines import open3d_available
    from rl3d.stages.raycast.renderer import angle_tuples, cast_camera_rays, prepare_mesh, render_views, shade_hits

    device = pick_device(a.device)
    cuda = device.startswith("cuda")
    n = a.meshes or (64 if cuda else 4)
    res = a.resolution or (512 if cuda else 48)
    k = a.supersample
    meshes = [test_mesh()] * n if a.sphere else voxel_meshes(n)
    az, el = angle_tuples(*view_angles(a.views))
    card = torch.cuda.get_device_name(torch.device(device)) if cuda else f"cpu, {torch.get_num_threads()} threads"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    views = n * len(az)
    faces = np.mean([len(m.faces) for m in meshes])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; device {device} ({card})")
    print(f"{n} meshes ({faces:.0f} triangles on average) x {len(az)} views at {res} px, supersample {k}; "
          f"best of {a.repeats}")

    t0 = time.perf_counter()
    prepared = [prepare_mesh(m, az, el, 40.0, "white", with_normals=False) for m in meshes]
    prep_s = time.perf_counter() - t0

    def baseline():
        return [shade_hits(p, cast_camera_rays(p.verts, p.faces, az, el, res * k, 40.0, "torch", device), k)
                for p in prepared]

    every = [dataclasses.replace(p, solid=0) for p in prepared]

    def batched_all_faces():
        return torch_renderer.render_batch(every, az, el, res, 40.0, device, k)

    def batched():
        return torch_renderer.render_batch(prepared, az, el, res, 40.0, device, k)

    want, got = baseline(), batched_all_faces()  # warm-up (CUDA context, kernels, cached rays) and the bit check
    same = all(np.array_equal(w[c], g[c]) for w, g in zip(want, got) for c in ("rgb", "depth", "mask"))
    skipped = batched()
    differ = sum(int((g["rgb"] != s["rgb"]).any(-1).sum()) for g, s in zip(got, skipped))
    rows = [("torch per mesh (baseline)", best_of(baseline, a.repeats, sync))]
    rows.append(("torch batched, all faces", best_of(batched_all_faces, a.repeats, sync)))
    rows.append(("torch batched", best_of(batched, a.repeats, sync)))
    if cuda:
        rows += sized_variants(prepared, az, el, res, k, device, a.repeats, sync)
    if open3d_available():
        rows.append(("open3d per mesh (cpu)", best_of(
            lambda: [render_views(m, az, el, res, with_normals=False, backend="open3d", supersample=k)
                     for m in meshes], 1, lambda: None)))
    if a.stage:
        rows.append(("rl3d render, torch (end to end)", stage_seconds(meshes, a.views, res, k, device)))
    base = rows[0][1]
    print(f"\n{'variant':34s} {'seconds':>8s} {'views/s':>9s} {'ms/view':>8s} {'vs baseline':>12s}")
    for name, secs in rows:
        print(f"{name:34s} {secs:8.3f} {views / secs:9.1f} {1000 * secs / views:8.2f} {base / secs:11.2f}x")
    print(f"\nbatched images (all faces) identical to the baseline: {same}; skipping back faces changed "
          f"{differ} of {views * res * res} pixels; {sum(p.solid != 0 for p in prepared)} of {n} meshes closed")
    print(f"mesh preparation (CPU, numpy; in the render "
          f"command's worker processes): {1000 * prep_s / n:.1f} ms/mesh")
    print("goal: >= 500 views/s at 512 px on one H100/H200 (torch batched)")
    if a.profile:
        print_profile(batched, sync, cuda)


def sized_variants(prepared, az, el, res: int, k: int, device: str, repeats: int, sync) -> list:
    """The batched renderer with 4x the meshes a batch, and with 4x the pairs a caster step."""
    import torch

    from rl3d.stages.raycast import torch_engine, torch_renderer

    rows = []
    default = torch_renderer.CUDA_BATCH_RAYS
    try:
        torch_renderer.CUDA_BATCH_RAYS = default * 4
        rows.append(("torch batched, 4x meshes a batch", best_of(
            lambda: torch_renderer.render_batch(prepared, az, el, res, 40.0, device, k), repeats, sync)))
    except torch.OutOfMemoryError as e:
        print(f"4x meshes a batch: {type(e).__name__}")
    finally:
        torch_renderer.CUDA_BATCH_RAYS = default
    rows.append(("torch batched, 4x pairs a step", best_of(
        lambda: torch_renderer.render_batch(prepared, az, el, res, 40.0, device, k,
                                            max_pairs=4 * torch_engine.CUDA_PAIRS), repeats, sync)))
    return rows


def print_profile(fn, sync, cuda: bool, rows: int = 25) -> None:
    """torch's profiler over one call of `fn`: operators by their own device time (GPU) or CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        fn()
        sync()
    table = prof.key_averages()
    for key in (("self_device_time_total", "self_cuda_time_total") if cuda else ()) + ("self_cpu_time_total",):
        try:
            print(f"\none batched render, by {key}:\n" + table.table(sort_by=key, row_limit=rows))
            return
        except (AttributeError, KeyError, ValueError):
            continue


def stage_seconds(meshes, views: int, res: int, k: int, device: str) -> float:
    """Wall seconds of `rl3d render` (torch backend, no contact sheets) on the meshes as GLBs."""
    from rl3d.formats.glb import write_glb
    from rl3d.stages.contract import StageOptions
    from rl3d.stages.render import run_render

    with tempfile.TemporaryDirectory() as tmp:
        glbs = Path(tmp) / "glbs"
        glbs.mkdir()
        for i, m in enumerate(meshes):
            write_glb(m, glbs / f"m{i:05d}.glb")
        t0 = time.perf_counter()
        run_render(glbs, StageOptions(out=Path(tmp) / "out", quiet=True), views=views, resolution=res,
                   sheet=False, backend="torch", device=device, supersample=k)
        return time.perf_counter() - t0


if __name__ == "__main__":
    main()
