"""`rl3d render`: multi-view PNG renders of every mesh in a samples table or a GLB directory."""
from __future__ import annotations

import time

import click

from rl3d.cli.common import handle_errors, pop_stage_options, report, stage_options

EXAMPLES = """Examples:

\b
  rl3d render --samples runs/demo/step-000001/gen --out runs/demo/step-000001/renders
  rl3d render --samples runs/demo/prompts --views 1 --resolution 32 --out runs/demo/prompt_renders
  rl3d render --samples meshes/ --preset orbit --backend torch --device cuda --depth --out renders/
"""


@click.command("render", epilog=EXAMPLES, short_help="Multi-view PNG renders of meshes (ray casting on CPU or GPU).")
@click.option("--samples", required=True, type=click.Path(exists=True),
              help="Table with sample_id + mesh_path columns (file, shard dir or glob: gen samples, "
                   "synth objects), or a directory of .glb files (sample_id = file stem).")
@click.option("--views", default=6, show_default=True, type=int,
              help="Evenly spaced azimuths (from a 3/4 front view) at --elevation.")
@click.option("--elevation", default=20.0, show_default=True, type=float, help="Camera elevation in degrees.")
@click.option("--preset", type=click.Choice(["default", "orbit"]), default="default", show_default=True,
              help="orbit: 16 views, 8 azimuths at 10 and 40 degrees elevation (ignores --views).")
@click.option("--resolution", default=512, show_default=True, type=int, help="Image width = height in pixels.")
@click.option("--background", default="white", show_default=True, help="Colour name or hex, e.g. '#202020'.")
@click.option("--fov", default=40.0, show_default=True, type=float, help="Vertical field of view in degrees.")
@click.option("--framing", type=click.Choice(["object", "cube"]), default="object", show_default=True,
              help="object: centre the mesh and fill ~80% of the frame; cube: look at the origin with the "
                   "unit cube (the voxel grid) in view, so sizes compare across meshes.")
@click.option("--depth", is_flag=True, help="Also save z-depth as 16-bit PNG (millimetres, 0 = background).")
@click.option("--normals", is_flag=True, help="Also save camera-space normal maps as PNG.")
@click.option("--no-sheet", is_flag=True, help="Skip the per-mesh contact sheet (sheet.png).")
@click.option("--workers", default=None, type=int, show_default="open3d: min(2, CPU cores); torch: cores - 1, max 16",
              help="open3d backend: processes rendering meshes in parallel. torch backend: processes reading "
                   "meshes and writing PNGs while this process renders batches of meshes on --device.")
@click.option("--backend", type=click.Choice(["auto", "open3d", "torch"]), default="auto", show_default=True,
              help="Ray caster. open3d: Embree on the CPU; torch: PyTorch on --device, many meshes at once (GPU "
                   "throughput, no open3d needed); auto: torch where CUDA is available, else open3d when "
                   "installed, else torch. See docs/render.md.")
@click.option("--supersample", default=2, show_default=True, type=click.IntRange(1, 8),
              help="Anti-aliasing: K x K rays per pixel, averaged (box filter); costs ~K^2 the ray casting. "
                   "1: one ray through each pixel centre (aliased edges).")
@click.option("--device", default=None, show_default="cuda when available, else cpu",
              help="torch backend: torch device, e.g. cuda, cuda:1, cpu.")
@click.option("--all-faces", is_flag=True,
              help="torch backend: cast against every face, also a closed mesh's faces turned away from the "
                   "camera, which it skips by default (about half the work; a few pixels in a million differ "
                   "where a ray slips between two faces).")
@stage_options
@handle_errors
def command(samples, views, elevation, preset, resolution, background, fov, framing, depth, normals, no_sheet, workers,
            backend, device, supersample, all_faces, **kw):
    """Render every mesh to PNG views (headless ray casting on CPU or GPU, deterministic).

    Writes _images/<sample_id>/view-XX.png, a contact sheet per mesh, and a renders table
    (one row per sample and view; failed meshes keep a status and message).
    """
    from rl3d.stages.render import run_render

    started = time.time()
    opts = pop_stage_options(kw)
    summary = run_render(samples, opts, views=views, preset=preset, elevation=elevation, resolution=resolution,
                         background=background, fov=fov, framing=framing, depth=depth, normals=normals, sheet=not no_sheet,
                         workers=workers, backend=backend, device=device, supersample=supersample,
                         skip_back_faces=not all_faces)
    report(summary, opts, stage="render", started=started)
