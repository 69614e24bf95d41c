"""The CPU cost of the image files a step writes and reads back, old way against new, in one run:
PNG encoding by Pillow at zlib level 6 (its default) and 1, and by rl3d's encoder (images.png_bytes:
every row Up-filtered by one numpy subtraction, zlib level 1), decoding each, the contact sheet's
tile resize (Lanczos from 512 px, and box-reduced first), and the CLIP reward's preprocessing
(the image processor on the CPU against the same steps in torch, here on the CPU too). Then a
mesh's files as render writes them (6 views and the contact sheet, write_job) by one worker a core:
Pillow's encoder in processes (the views pickled to them: before), rl3d's encoder in processes, and
rl3d's encoder in threads of one process (now).

    python benchmarks/bench_images.py                  # renders 4 synth objects x 6 views at 512 px first
    python benchmarks/bench_images.py --views DIR      # any folder of view-*.png
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def per_image(fn, items, repeat=3) -> float:
    """Milliseconds per item of fn over items (best of `repeat` passes)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, (time.perf_counter() - t0) / len(items) * 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--views", default=None, help="a folder holding view-*.png renders (default: render some)")
    a = ap.parse_args()
    folder = Path(a.views) if a.views else Path(tempfile.mkdtemp(prefix="bench-images-"))
    if not a.views:
        rl3d = [sys.executable, "-m", "rl3d.cli.main"]
        subprocess.run(rl3d + ["synth", "--n", "4", "--seed", "3", "--out", str(folder / "objects"), "--quiet"], check=True)
        subprocess.run(rl3d + ["render", "--samples", str(folder / "objects"), "--out", str(folder / "renders"),
                               "--views", "6", "--resolution", "512", "--quiet"], check=True)
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in sorted(folder.rglob("view-*.png"))]
    if not arrays:
        sys.exit(f"{folder}: no view-*.png")
    print(f"{len(arrays)} views of {arrays[0].shape[1]}x{arrays[0].shape[0]} px")

    def encode(level):
        def f(x):
            b = io.BytesIO()
            Image.fromarray(x).save(b, format="PNG", compress_level=level)
            return b.getvalue()
        return f
    rows = []
    for level in (6, 1):
        files = [encode(level)(x) for x in arrays]
        rows.append((f"PNG encode, level {level}", per_image(encode(level), arrays),
                     f"{np.mean([len(f) for f in files]) / 1024:.1f} KB a view"))
        rows.append((f"PNG decode, level {level}", per_image(lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")),
                                                             files), ""))
    from rl3d.stages.raycast.images import png_bytes

    files = [png_bytes(x) for x in arrays]
    rows.append(("PNG encode, rl3d's (Up filter, level 1)", per_image(png_bytes, arrays),
                 f"{np.mean([len(f) for f in files]) / 1024:.1f} KB a view"))
    tile = arrays[0].shape[0] // 2
    rows.append(("sheet tile, Lanczos", per_image(lambda x: Image.fromarray(x).resize((tile, tile), Image.Resampling.LANCZOS),
                                                  arrays), ""))
    rows.append(("sheet tile, box-reduced then Lanczos",
                 per_image(lambda x: Image.fromarray(x).resize((tile, tile), Image.Resampling.LANCZOS, reducing_gap=1.0),
                           arrays), ""))
    import torch

    from rl3d.stages.scoring.clip_scorer import device_preprocessing, load_scorer

    processor = load_scorer(device="cpu").image_processor
    pixels = device_preprocessing(processor)
    images = [Image.fromarray(x) for x in arrays]
    rows.append(("CLIP preprocessing, image processor", per_image(
        lambda im: processor(images=[im], return_tensors="np"), images), ""))
    batch = torch.from_numpy(np.stack(arrays))
    t0 = time.perf_counter()
    pixels(batch)
    rows.append(("CLIP preprocessing, torch (CPU, one batch)", (time.perf_counter() - t0) / len(arrays) * 1e3,
                 "the reward runs it on the GPU"))
    for name, ms, note in rows:
        print(f"{name:<45} {ms:8.2f} ms/view  {note}")
    print(f"ratios: encode level 6 / level 1 {rows[0][1] / rows[2][1]:.2f}x, Pillow level 1 / rl3d's "
          f"{rows[2][1] / rows[4][1]:.2f}x, decode {rows[1][1] / rows[3][1]:.2f}x, sheet tile {rows[5][1] / rows[6][1]:.2f}x")
    mesh_writes(np.stack(arrays[:6]) if len(arrays) >= 6 else np.stack(arrays))


def pillow_png(array, path) -> None:
    """The render's PNG writing before rl3d's encoder."""
    from rl3d.formats.shards import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


def mesh_writes(rgb: np.ndarray, meshes: int = 64) -> None:
    """Milliseconds a mesh for render's write_job over `meshes` meshes, one worker a core."""
    import os
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from rl3d.stages import render
    from rl3d.stages.raycast import images

    workers = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    opts = render.RenderOptions(len(rgb), "default", render.DEFAULT_ELEVATION, rgb.shape[1], "white",
                                render.DEFAULT_FOV, False, False, True, "object", "torch", "cpu", 1, True)
    rows = [{"sample_id": "m", "view": i, "azimuth": 60.0 * i, "elevation": 20.0, "status": "ok"} for i in range(len(rgb))]
    fast = images.save_png
    times = []
    for name, encoder, pool in (("Pillow's encoder, processes", pillow_png, ProcessPoolExecutor),
                                ("rl3d's encoder, processes", fast, ProcessPoolExecutor),
                                ("rl3d's encoder, threads", fast, ThreadPoolExecutor)):
        images.save_png = encoder  # before the processes start: forked workers keep it
        best = float("inf")
        try:
            for _ in range(2):
                with pool(workers) as ex, tempfile.TemporaryDirectory() as out:
                    list(ex.map(abs, range(workers)))  # workers up before the clock starts
                    t0 = time.perf_counter()
                    jobs = [ex.submit(render.write_job, {"sample_id": f"m{k}", "prompt": "a red chair"},
                                      [dict(r) for r in rows], {"rgb": rgb}, out, opts) for k in range(meshes)]
                    for j in jobs:
                        j.result()
                    best = min(best, (time.perf_counter() - t0) / meshes * 1e3)
        finally:
            images.save_png = fast
        times.append(best)
        print(f"a mesh's {len(rgb)} views and sheet, {name:<28} {best:8.2f} ms/mesh  ({workers} workers)")
    print(f"ratio: before / now {times[0] / times[2]:.2f}x")


if __name__ == "__main__":
    main()
