"""`rl3d render`: headless multi-view renders of meshes (ray casting, deterministic).

Reads a samples/objects table (or a directory of GLBs), renders every mesh this shard owns with
the stages/raycast library and writes, under the stage out dir, _images/<sample_id>/view-XX.png,
optional depth-XX.png (uint16 z-depth in millimetres, 0 = background) and normal-XX.png
(camera-space normals, x right, y up, z towards the camera, as (n + 1) / 2 * 255; background
0), and sheet.png, a captioned contact sheet of the views for people; then the renders table
(one row per sample and view) through the stage contract.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rl3d.formats import shards as shards_io
from rl3d.formats.errors import InputError
from rl3d.formats.glb import read_glb
from rl3d.formats.shards import check_id
from rl3d.formats.tables import absolute_media, list_parts, provenance
from rl3d.stages.contract import run_stage
from rl3d.stages.raycast import images
from rl3d.stages.raycast.cameras import DEFAULT_ELEVATION, DEFAULT_FOV, check_framing, view_angles
from rl3d.stages.raycast.renderer import check_supersample, render_views, resolve_engine
from rl3d.stages.raycast.shading import parse_color

COPY_COLUMNS = ("prompt_id", "level", "sample_index", "prompt")


@dataclass(frozen=True)
class RenderOptions:
    views: int = 6
    preset: str = "default"
    elevation: float = DEFAULT_ELEVATION
    resolution: int = 512
    background: str = "white"
    fov: float = DEFAULT_FOV
    depth: bool = False
    normals: bool = False
    sheet: bool = True
    framing: str = "object"
    backend: str = "open3d"      # resolved: "open3d" or "torch"
    device: str | None = None    # torch backend only; not part of the output's config
    supersample: int = 2         # k x k rays per pixel (anti-aliasing); 1 = one ray per pixel centre


def _safe_dir_name(sample_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in sample_id) or "_"


def render_one(job: dict, out: str, opts: RenderOptions) -> list[dict]:
    """Render one mesh job (a dict: sample_id, mesh_path, status, message, copied keys) into
    rows of the renders table, one per view. Errors become rows, never exceptions."""
    rows, res = render_job(job, opts)
    return write_job(job, rows, res, out, opts)


def render_job(job: dict, opts: RenderOptions) -> tuple[list[dict], dict | None]:
    """The rows of one mesh job and its rendered arrays (None when the job failed: the rows
    then carry the status and message)."""
    az, el = view_angles(opts.views, opts.preset, opts.elevation)
    base = {k: job[k] for k in COPY_COLUMNS if k in job}
    rows = [{"sample_id": job["sample_id"], "view": i, "azimuth": float(az[i]), "elevation": float(el[i]),
             "image_path": "", "status": "ok", "message": "", **base} for i in range(len(az))]
    for r in rows:
        r.update({"depth_path": "", "normal_path": ""} if opts.depth or opts.normals else {})
        if opts.sheet:
            r["sheet_path"] = ""

    def fail(status, message):
        for r in rows:
            r.update(status=status, message=message)
        return rows, None

    if job.get("status", "ok") != "ok":
        return fail(job["status"], f"upstream {job['status']}: {job.get('message') or ''}".strip())
    if not job.get("mesh_path"):
        return fail("render_error", "no mesh_path")
    try:
        mesh = read_glb(job["mesh_path"])
        res = render_views(mesh, az, el, opts.resolution, opts.fov, opts.background, framing=opts.framing,
                           with_normals=opts.normals, backend=opts.backend, device=opts.device,
                           supersample=opts.supersample)
    except Exception as e:  # corrupt GLB, empty mesh, degenerate geometry
        return fail("render_error", f"{type(e).__name__}: {e}"[:500])
    return rows, res


def write_job(job: dict, rows: list[dict], res: dict | None, out: str, opts: RenderOptions) -> list[dict]:
    """Write a rendered job's PNGs (views, optional depth/normals, sheet) and fill in the rows' paths."""
    if res is None:
        return rows
    az, el = [r["azimuth"] for r in rows], [r["elevation"] for r in rows]
    rel = Path(shards_io.IMAGES) / _safe_dir_name(job["sample_id"])
    for i, r in enumerate(rows):
        r["image_path"] = str(rel / f"view-{i:02d}.png")
        images.save_png(res["rgb"][i], Path(out) / r["image_path"])
        if opts.depth:
            r["depth_path"] = str(rel / f"depth-{i:02d}.png")
            images.save_png(images.depth_millimetres(res["depth"][i]), Path(out) / r["depth_path"])
        if opts.normals:
            r["normal_path"] = str(rel / f"normal-{i:02d}.png")
            images.save_png(images.normal_colours(res["normal"][i], res["mask"][i]), Path(out) / r["normal_path"])
    if opts.sheet:
        caption = job["sample_id"] + (f"  |  {job['prompt']}" if job.get("prompt") else "")
        labels = [f"az {a:.0f}  el {e:.0f}" for a, e in zip(az, el)]
        sheet_rel = str(rel / "sheet.png")
        images.save_png(images.contact_sheet(res["rgb"], caption, labels, opts.background), Path(out) / sheet_rel)
        for r in rows:
            r["sheet_path"] = sheet_rel
    return rows


# ---- inputs -----------------------------------------------------------------------------------

def read_jobs(samples: str | os.PathLike) -> list[dict]:
    """Mesh jobs from a samples/objects table (needs sample_id + mesh_path) or a dir of GLBs."""
    p = Path(samples)
    glbs = sorted(g for g in p.glob("*.glb") if not g.name.startswith(".")) if p.is_dir() else []
    if glbs and not any(p.glob("*.parquet")):  # hidden .tmp-* GLBs are writes a kill interrupted
        return [{"sample_id": g.stem, "mesh_path": str(g.resolve()), "status": "ok", "message": ""} for g in glbs]
    jobs, seen = [], set()
    for f in list_parts(p):
        try:
            names = pq.read_schema(f).names
        except Exception as e:
            raise InputError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        for need in ("sample_id", "mesh_path"):
            if need not in names:
                raise InputError(f"{f}: missing column {need!r} (render needs sample_id and mesh_path)")
        cols = ["sample_id", "mesh_path"] + [c for c in ("status", "message", *COPY_COLUMNS) if c in names]
        try:
            t = absolute_media(pq.read_table(f, columns=cols), f.parent)
        except Exception as e:  # a footer that reads but truncated or corrupt pages
            raise InputError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        for i, row in enumerate(t.to_pylist()):
            if (why := check_id(row["sample_id"] or "", "sample_id")) is not None:  # it names images/<id>/
                raise InputError(f"{f}: row {i}: {why}")
            row["status"] = row.get("status") or "ok"
            row["message"] = row.get("message") or ""
            row["mesh_path"] = row["mesh_path"] or ""
            if row["sample_id"] in seen:  # two meshes would write the same images/<sample_id>/
                raise InputError(f"{f}: row {i}: duplicate sample_id {row['sample_id']!r}")
            seen.add(row["sample_id"])
            jobs.append(row)
    if not jobs:
        raise InputError(f"{p}: the table has no rows (nothing to render)")
    return jobs


def _render_batch(args) -> list[dict]:
    jobs, out, opts = args
    return [r for job in jobs for r in render_one(job, out, opts)]


def _render_in_process(jobs: list[dict], out: str, opts: RenderOptions, progress, writers: int = 4) -> list[dict]:
    """Render jobs one after another here (torch backend) while threads encode and write the
    PNGs of earlier meshes (Pillow releases the GIL while encoding). Rows keep input order."""
    rows: list[dict] = []
    pending: deque = deque()
    with ThreadPoolExecutor(writers) as pool:
        for job in progress.track(jobs, total=len(jobs), desc="render"):
            job_rows, res = render_job(job, opts)
            pending.append(pool.submit(write_job, job, job_rows, res, out, opts))
            while len(pending) > 2 * writers:  # bounds the rendered arrays held in memory
                rows += pending.popleft().result()
        while pending:
            rows += pending.popleft().result()
    return rows


def renders_table(rows: list[dict], opts: RenderOptions, copied: list[str]) -> pa.Table:
    cols = {"sample_id": pa.string(), "view": pa.int32(), "azimuth": pa.float32(), "elevation": pa.float32(),
            "image_path": pa.string(), "status": pa.string(), "message": pa.string()}
    types = {"prompt_id": pa.string(), "level": pa.string(), "sample_index": pa.int32(), "prompt": pa.string()}
    cols.update({c: types[c] for c in copied})
    if opts.depth or opts.normals:
        cols.update(depth_path=pa.string(), normal_path=pa.string())
    if opts.sheet:
        cols["sheet_path"] = pa.string()
    return pa.table({c: pa.array([r.get(c) for r in rows], t) for c, t in cols.items()})


def run_render(samples, opts, views: int = 6, preset: str = "default", elevation: float = DEFAULT_ELEVATION,
               resolution: int = 512, background="white", fov: float = DEFAULT_FOV, depth: bool = False,
               normals: bool = False, sheet: bool = True, framing: str = "object",
               workers: int | None = None, backend: str = "auto", device: str | None = None,
               supersample: int = 2) -> dict:
    """Render every mesh of `samples` (table or GLB dir) owned by opts.shard into opts.out.

    open3d backend: `workers` processes render meshes in parallel. torch backend: meshes are
    rendered one after another in this process (torch parallelises each cast itself, and one
    CUDA context beats one per worker) while a few threads write the PNGs."""
    if resolution < 8 or resolution > 4096:
        raise InputError(f"--resolution {resolution}: expected 8..4096")
    if not 1.0 <= fov <= 150.0:
        raise InputError(f"--fov {fov}: expected 1..150 degrees")
    parse_color(background)
    check_framing(framing)
    view_angles(views, preset, elevation)  # validate before any work
    check_supersample(supersample)
    backend, device = resolve_engine(backend, device)
    ropts = RenderOptions(views, preset, float(elevation), int(resolution), str(background), float(fov),
                          bool(depth), bool(normals), bool(sheet), str(framing), backend, device, int(supersample))
    jobs = read_jobs(samples)
    workers = workers or min(2, os.cpu_count() or 1)
    # the backend changes edge pixels, so it is part of the config; the device is not. Supersample 1
    # renders as before supersampling existed: left out, its config hash is the old one.
    config = {"samples": str(Path(samples).resolve()),
              **{k: v for k, v in asdict(ropts).items() if k != "device" and not (k == "supersample" and v == 1)}}
    copied = [c for c in COPY_COLUMNS if any(c in j for j in jobs)]  # same schema in every shard

    def produce(shard, progress):
        mine = [j for j in jobs if shard.owns(j.get("prompt_id") or j["sample_id"])]
        t0 = time.time()
        rows: list[dict] = []
        if backend == "torch":
            rows = _render_in_process(mine, str(opts.out), ropts, progress)
        elif workers <= 1 or len(mine) <= 1:
            for job in progress.track(mine, total=len(mine), desc="render"):
                rows += render_one(job, str(opts.out), ropts)
        else:
            # a few meshes per task keeps process overhead low; map keeps input order (determinism)
            chunk = max(1, min(8, len(mine) // (workers * 4)))
            batches = [(mine[i:i + chunk], str(opts.out), ropts) for i in range(0, len(mine), chunk)]
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                for part in progress.track(pool.map(_render_batch, batches), total=len(batches), desc="render"):
                    rows += part
        secs = time.time() - t0
        ok = sum(1 for r in rows if r["status"] == "ok")
        failed = sorted({r["sample_id"] for r in rows if r["status"] != "ok"})
        stats = {"meshes": len(mine), "views": len(rows), "ok_views": ok, "failed_meshes": len(failed),
                 "views_per_s": round(ok / secs, 2) if secs > 0 else None}
        return renders_table(rows, ropts, copied), stats

    # a dir of GLBs is no table: nothing to name
    made_from = {"samples": provenance(samples).table_id} if any(Path(samples).glob("*.parquet")) or \
        Path(samples).suffix == ".parquet" else None
    return run_stage("render", "renders", opts, config, produce, made_from=made_from)
