"""`rl3d render`: headless multi-view renders of meshes (ray casting, deterministic).

Reads a samples/objects table (or a directory of GLBs), renders every mesh this shard owns with
the stages/raycast library and writes, under the stage out dir, _images/<sample_id>/view-XX.png,
optional depth-XX.png (uint16 z-depth in millimetres, 0 = background) and normal-XX.png
(camera-space normals, x right, y up, z towards the camera, as (n + 1) / 2 * 255; background
0), and sheet.png, a captioned contact sheet of the views for people; then the renders table
(one row per sample and view) through the stage contract.

A samples row with a textured mesh (gen --texture-hook: `textured_path`) is rendered from that
mesh; the renders table then says which mesh each row shows (`mesh_source`: textured or mesh).
"""
from __future__ import annotations

import os
import time
from collections import deque
from contextlib import contextmanager, nullcontext
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
from rl3d.stages.contract import Job, process_pool, usable_cores
from rl3d.stages.raycast import held_views, images
from rl3d.stages.raycast.cameras import DEFAULT_ELEVATION, DEFAULT_FOV, check_framing, view_angles
from rl3d.stages.raycast.renderer import (angle_tuples, check_supersample, prepare_mesh, render_views,
                                          resolve_engine)
from rl3d.stages.raycast.shading import parse_color

COPY_COLUMNS = ("prompt_id", "level", "sample_index", "prompt")
WRITER_THREADS = 4        # PNG writers beside the caster when no worker processes are used
MAX_WORKERS = 16          # torch backend: processes reading meshes and writing PNGs
MIN_JOBS_FOR_PROCESSES = 32  # fewer meshes: starting processes costs more than it saves


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
    skip_back_faces: bool = True  # torch backend: no casting against a solid's faces turned away


def _safe_dir_name(sample_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in sample_id) or "_"


def render_one(job: dict, out: str, opts: RenderOptions) -> list[dict]:
    """Render one mesh job (a dict: sample_id, mesh_path, status, message, copied keys) into
    rows of the renders table, one per view. Errors become rows, never exceptions."""
    rows, res = render_job(job, opts)
    return write_job(job, rows, res, out, opts)


def job_mesh(job: dict) -> tuple[str, str]:
    """(path, source) of the mesh a job renders: its textured GLB when it has one (gen
    --texture-hook), else its mesh."""
    if job.get("textured_path"):
        return job["textured_path"], "textured"
    return job.get("mesh_path") or "", "mesh"


def job_rows(job: dict, opts: RenderOptions) -> list[dict]:
    """The renders rows of one mesh job, one per view, status ok and no files yet."""
    az, el = view_angles(opts.views, opts.preset, opts.elevation)
    base = {k: job[k] for k in COPY_COLUMNS if k in job}
    if "textured_path" in job:  # only for tables that can hold textured meshes: default outputs unchanged
        base["mesh_source"] = job_mesh(job)[1]
    rows = [{"sample_id": job["sample_id"], "view": i, "azimuth": float(az[i]), "elevation": float(el[i]),
             "image_path": "", "status": "ok", "message": "", **base} for i in range(len(az))]
    for r in rows:
        r.update({"depth_path": "", "normal_path": ""} if opts.depth or opts.normals else {})
        if opts.sheet:
            r["sheet_path"] = ""
    return rows


def fail_rows(rows: list[dict], status: str, message: str) -> list[dict]:
    for r in rows:
        r.update(status=status, message=message)
    return rows


def error_message(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def read_job(job: dict, rows: list[dict]):
    """The job's mesh (trimesh), or None with the rows failed (upstream status, no mesh, a GLB
    that does not read)."""
    if job.get("status", "ok") != "ok":
        fail_rows(rows, job["status"], f"upstream {job['status']}: {job.get('message') or ''}".strip())
        return None
    path, _ = job_mesh(job)
    if not path:
        fail_rows(rows, "render_error", "no mesh_path")
        return None
    try:
        return read_glb(path)
    except Exception as e:  # corrupt GLB, empty mesh
        fail_rows(rows, "render_error", error_message(e))
        return None


def render_job(job: dict, opts: RenderOptions) -> tuple[list[dict], dict | None]:
    """The rows of one mesh job and its rendered arrays (None when the job failed: the rows
    then carry the status and message)."""
    rows = job_rows(job, opts)
    mesh = read_job(job, rows)
    if mesh is None:
        return rows, None
    az, el = view_angles(opts.views, opts.preset, opts.elevation)
    try:
        res = render_views(mesh, az, el, opts.resolution, opts.fov, opts.background, framing=opts.framing,
                           with_normals=opts.normals, backend=opts.backend, device=opts.device,
                           supersample=opts.supersample, skip_back_faces=opts.skip_back_faces)
    except Exception as e:  # empty mesh, degenerate geometry
        return fail_rows(rows, "render_error", error_message(e)), None
    return rows, res


def prepare_job(job: dict, opts: RenderOptions):
    """The rows of one mesh job and its mesh prepared for the torch renderer (None when the job
    failed: the rows then carry the status and message). Runs in worker processes."""
    rows = job_rows(job, opts)
    mesh = read_job(job, rows)
    if mesh is None:
        return rows, None
    az, el = view_angles(opts.views, opts.preset, opts.elevation)
    try:
        return rows, prepare_mesh(mesh, az, el, opts.fov, opts.background, framing=opts.framing,
                                  with_normals=opts.normals, skip_back_faces=opts.skip_back_faces)
    except Exception as e:  # empty mesh, degenerate geometry
        return fail_rows(rows, "render_error", error_message(e)), None


def write_job(job: dict, rows: list[dict], res: dict | None, out: str, opts: RenderOptions) -> list[dict]:
    """Write a rendered job's PNGs (views, optional depth/normals, sheet) and fill in the rows' paths."""
    if res is None:
        return rows
    az, el = [r["azimuth"] for r in rows], [r["elevation"] for r in rows]
    rel = Path(shards_io.IMAGES) / _safe_dir_name(job["sample_id"])
    folder = shards_io.inside(out, rel)  # once a mesh: its files' own names cannot lead out of it

    def write(name: str, pixels) -> str:
        images.save_png(pixels, shards_io.child(folder, name))
        return str(rel / name)
    for i, r in enumerate(rows):
        r["image_path"] = write(f"view-{i:02d}.png", res["rgb"][i])
        if opts.depth:
            r["depth_path"] = write(f"depth-{i:02d}.png", images.depth_millimetres(res["depth"][i]))
        if opts.normals:
            r["normal_path"] = write(f"normal-{i:02d}.png", images.normal_colours(res["normal"][i], res["mask"][i]))
    if opts.sheet:
        caption = job["sample_id"] + (f"  |  {job['prompt']}" if job.get("prompt") else "")
        labels = [f"az {a:.0f}  el {e:.0f}" for a, e in zip(az, el)]
        sheet_rel = write("sheet.png", images.contact_sheet(res["rgb"], caption, labels, opts.background))
        for r in rows:
            r["sheet_path"] = sheet_rel
    return rows


# ---- inputs -----------------------------------------------------------------------------------

def read_jobs(samples: str | os.PathLike) -> list[dict]:
    """Mesh jobs from a samples/objects table (needs sample_id + mesh_path) or a dir of GLBs."""
    p = Path(samples)
    glbs = sorted(g for g in p.glob("*.glb") if not g.name.startswith(".")) if p.is_dir() else []
    if glbs and not any(p.glob("*.parquet")):  # hidden .tmp-* GLBs are writes a kill interrupted
        named: dict[str, Path] = {}
        for g in glbs:  # two files whose stems sanitise alike would render into one images folder
            if (other := named.setdefault(_safe_dir_name(g.stem), g)) is not g:
                raise InputError(f"{g}: sample_id {g.stem!r} and {other.name} ({other.stem!r}) would both render "
                                 f"into {shards_io.IMAGES}/{_safe_dir_name(g.stem)}/; rename one")
        return [{"sample_id": g.stem, "mesh_path": str(g.resolve()), "status": "ok", "message": ""} for g in glbs]
    dirs: dict[str, tuple[str, str]] = {}  # images folder -> (sample_id, "file: row i") of its first sample
    jobs, seen = [], set()
    for f in list_parts(p):
        try:
            names = pq.read_schema(f).names
        except Exception as e:
            raise InputError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        for need in ("sample_id", "mesh_path"):
            if need not in names:
                raise InputError(f"{f}: missing column {need!r} (render needs sample_id and mesh_path)")
        cols = ["sample_id", "mesh_path"] + [c for c in ("textured_path", "status", "message", *COPY_COLUMNS)
                                             if c in names]
        try:
            t = absolute_media(pq.read_table(f, columns=cols), f.parent)
        except Exception as e:  # a footer that reads but truncated or corrupt pages
            raise InputError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        for c in t.schema:  # copied into the renders table with fixed types: a float index fails there
            want = pa.types.is_integer if c.name == "sample_index" else \
                (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t))
            if not (want(c.type) or pa.types.is_null(c.type)):
                raise InputError(f"{f}: column {c.name!r} is {c.type}, expected "
                                 f"{'an integer' if c.name == 'sample_index' else 'a string'}")
        for i, row in enumerate(t.to_pylist()):
            if (why := check_id(row["sample_id"] or "", "sample_id")) is not None:  # it names images/<id>/
                raise InputError(f"{f}: row {i}: {why}")
            row["status"] = row.get("status") or "ok"
            row["message"] = row.get("message") or ""
            row["mesh_path"] = row["mesh_path"] or ""
            if row["sample_id"] in seen:  # two meshes would write the same images/<sample_id>/
                raise InputError(f"{f}: row {i}: duplicate sample_id {row['sample_id']!r}")
            seen.add(row["sample_id"])
            first = dirs.setdefault(_safe_dir_name(row["sample_id"]), (row["sample_id"], f"{f}: row {i}"))
            if first[0] != row["sample_id"]:  # media paths are injective: refuse ids that sanitise alike
                raise InputError(f"{f}: row {i}: sample_id {row['sample_id']!r} and {first[0]!r} ({first[1]}) "
                                 f"would both render into {shards_io.IMAGES}/{_safe_dir_name(row['sample_id'])}/; "
                                 f"give them ids that differ in letters, digits or -_.=+")
            jobs.append(row)
    if not jobs:
        raise InputError(f"{p}: the table has no rows (nothing to render)")
    return jobs


def _render_batch(args) -> list[dict]:
    jobs, out, opts = args
    return [r for job in jobs for r in render_one(job, out, opts)]


def written_views(opts: RenderOptions) -> set[str]:
    """The views render writes as files: rgb always, depth and normals (with their mask) when asked."""
    return {"rgb"} | ({"depth"} if opts.depth else set()) | ({"normal", "mask"} if opts.normals else set())


def _render_prepared(prepared: list, az: tuple, el: tuple, opts: RenderOptions, device_rgb: bool = False) -> list:
    """Views of prepared meshes from the torch renderer, in batches; a batch that fails is
    rendered again mesh by mesh, so that one bad mesh fails alone (its entry is the exception)."""
    from rl3d.stages.raycast import torch_renderer  # torch: imported only for this backend (see renderer.py)

    def batch(part):
        return torch_renderer.render_batch(part, az, el, opts.resolution, opts.fov, opts.device, opts.supersample,
                                           with_depth=opts.depth, with_normals=opts.normals, device_rgb=device_rgb,
                                           host=written_views(opts))
    try:
        return batch(prepared)
    except Exception as e:
        if len(prepared) == 1:
            return [e]
    out: list = []
    for p in prepared:
        try:
            out += batch([p])
        except Exception as e:
            out.append(e)
    return out


def _render_batched(jobs: list[dict], out: str, opts: RenderOptions, progress, workers: int,
                    resident_pool=None, hold: bool = False) -> list[dict]:
    """torch backend: `workers` processes read and prepare meshes (framing, colour tables), threads
    of this process encode and write the PNGs (threads do both when workers <= 1), while this
    process renders batches of many meshes at once on the device. Rows keep input order. `hold`:
    keep each written view in memory for a later stage of this process (held_views): on a GPU the
    device's copy, where the CLIP term's model runs (no host stacking and copying back), else the
    host's; meshes past the room left are read from their files.

    The views stay in this process: pickled to writer processes they were 4.8 GB a step through
    one pipe (rl3d train's default step), ~13 ms a mesh on the 2-core box, while PNG encoding
    (images.png_bytes) is zlib and numpy work that lets go of the GIL."""
    from rl3d.stages.raycast.torch_renderer import meshes_per_batch

    az, el = angle_tuples(*view_angles(opts.views, opts.preset, opts.elevation))
    per_batch = min(len(jobs), meshes_per_batch(len(az), opts.resolution * opts.supersample, opts.device))
    keep = written_views(opts)
    processes = resident_pool is not None or workers > 1
    pool = _pool_or_new(resident_pool, workers) if processes else ThreadPoolExecutor(WRITER_THREADS)
    writer = ThreadPoolExecutor(max(workers, WRITER_THREADS), thread_name_prefix="rl3d-png") if processes else None
    todo = iter(jobs)
    reads: deque = deque()      # (job, future of prepare_job), in input order
    writes: deque = deque()     # futures of write_job not yet known to be done
    results: list = []          # per job, in input order: its rows or the future of its write
    rgb: dict[int, object] = {}  # job index -> its views, to be held (held_views), within its room
    room = None  # bytes left to hold: held_views.room where the views are (device or host), asked once

    def refill():  # a few batches read ahead of the caster
        while len(reads) < 3 * per_batch and (job := next(todo, None)) is not None:
            reads.append((job, pool.submit(prepare_job, job, opts)))

    def read_batches():
        refill()
        while reads:
            part = []
            while reads and len(part) < per_batch:
                job, fut = reads.popleft()
                part.append((job, *fut.result()))
                refill()
            yield part

    with pool as pool, writer or nullcontext():
        for part in progress.track(read_batches(), total=-(-len(jobs) // per_batch), desc="render"):
            ready = [(job, rows, p) for job, rows, p in part if p is not None]
            views = iter(_render_prepared([p for *_, p in ready], az, el, opts, device_rgb=hold) if ready else [])
            for job, rows, p in part:
                res = next(views) if p is not None else None
                if isinstance(res, Exception):
                    rows, res = fail_rows(rows, "render_error", error_message(res)), None
                if res is None:
                    results.append(rows)
                    continue
                writes.append((writer or pool).submit(write_job, job, rows, {k: res[k] for k in keep}, out, opts))
                if hold:  # a batch cut by the room stays on the device whole (its meshes share a tensor)
                    mine, where = (res["device_rgb"], opts.device) if "device_rgb" in res else (res["rgb"], None)
                    room = held_views.room(where) if room is None else room
                    if mine.nbytes <= room:
                        rgb[len(results)] = mine
                        room -= mine.nbytes
                results.append(writes[-1])
            while len(writes) > 2 * per_batch + max(workers, WRITER_THREADS):  # bounds the images held
                writes.popleft().result()
        written = [x.result() if hasattr(x, "result") else x for x in results]
    root = os.path.realpath(out)  # as the next stage's read_table makes the paths absolute
    for j, views in rgb.items():
        for r in written[j]:
            if r["status"] == "ok" and r["image_path"]:
                held_views.hold(os.path.join(root, r["image_path"]), views[r["view"]])
    return [r for part in written for r in part]


def renders_table(rows: list[dict], opts: RenderOptions, copied: list[str]) -> pa.Table:
    cols = {"sample_id": pa.string(), "view": pa.int32(), "azimuth": pa.float32(), "elevation": pa.float32(),
            "image_path": pa.string(), "status": pa.string(), "message": pa.string()}
    types = {"prompt_id": pa.string(), "level": pa.string(), "sample_index": pa.int32(), "prompt": pa.string(),
             "mesh_source": pa.string()}
    cols.update({c: types[c] for c in copied})
    if opts.depth or opts.normals:
        cols.update(depth_path=pa.string(), normal_path=pa.string())
    if opts.sheet:
        cols["sheet_path"] = pa.string()
    return pa.table({c: pa.array([r.get(c) for r in rows], t) for c, t in cols.items()})


class RenderJob(Job):
    """Views of every mesh of a samples/objects table (or a dir of GLBs). `pool`: a process pool
    the caller keeps across runs (the resident loop), used instead of starting one per run.
    `hold_views`: keep the views written in this process's memory for a later stage of the same
    process (held_views; the torch backend's batched path, where the views are cast here)."""

    stage, kind = "render", "renders"

    def __init__(self, samples, views: int = 6, preset: str = "default", elevation: float = DEFAULT_ELEVATION,
                 resolution: int = 512, background="white", fov: float = DEFAULT_FOV, depth: bool = False,
                 normals: bool = False, sheet: bool = True, framing: str = "object",
                 workers: int | None = None, backend: str = "auto", device: str | None = None,
                 supersample: int = 2, pool=None, hold_views: bool = False, skip_back_faces: bool = True):
        if resolution < 8 or resolution > 4096:
            raise InputError(f"--resolution {resolution}: expected 8..4096")
        if not 1.0 <= fov <= 150.0:
            raise InputError(f"--fov {fov}: expected 1..150 degrees")
        parse_color(background)
        check_framing(framing)
        view_angles(views, preset, elevation)  # validate before any work
        check_supersample(supersample)
        backend, device = resolve_engine(backend, device)
        self.ropts = ropts = RenderOptions(views, preset, float(elevation), int(resolution), str(background),
                                           float(fov), bool(depth), bool(normals), bool(sheet), str(framing), backend,
                                           device, int(supersample), bool(skip_back_faces))
        self.samples, self.pool, self.hold_views = samples, pool, hold_views
        self.jobs = jobs = read_jobs(samples)
        if workers is None:
            workers = default_workers(backend)
        self.workers = workers
        # the backend changes edge pixels, so it is part of the config; the device is not. Supersample 1
        # renders as before supersampling existed: left out, its config hash is the old one. Skipping
        # back faces changes a few pixels of the torch caster's and nothing of open3d's.
        self._config = {"samples": str(Path(samples).resolve()),
                        **{k: v for k, v in asdict(ropts).items()
                           if k != "device" and not (k == "supersample" and v == 1)
                           and not (k == "skip_back_faces" and backend != "torch")}}
        copied = [c for c in COPY_COLUMNS if any(c in j for j in jobs)]  # same schema in every shard
        if any("textured_path" in j for j in jobs):
            copied.append("mesh_source")
        self.copied = copied
        self.out = ""

    def config(self) -> dict:
        return self._config

    def made_from(self):
        # a dir of GLBs is no table: nothing to name
        samples = self.samples
        if any(Path(samples).glob("*.parquet")) or Path(samples).suffix == ".parquet":
            return {"samples": provenance(samples).table_id}
        return None

    def run(self, opts) -> dict:
        shards_io.check_out_apart(opts.out, {"--samples": self.samples})
        self.out = str(opts.out)
        return super().run(opts)

    def produce(self, shard, progress):
        ropts, workers, out = self.ropts, self.workers, self.out
        mine = [j for j in self.jobs if shard.owns(j.get("prompt_id") or j["sample_id"])]
        progress.log(f"render: {len(mine)} meshes ({ropts.backend} backend)")
        t0 = time.time()
        rows: list[dict] = []
        if ropts.backend == "torch":
            few = len(mine) < MIN_JOBS_FOR_PROCESSES and self.pool is None
            rows = _render_batched(mine, out, ropts, progress, 1 if few else workers, self.pool,
                                   hold=self.hold_views) if mine else []
        elif (workers <= 1 and self.pool is None) or len(mine) <= 1:
            for job in progress.track(mine, total=len(mine), desc="render"):
                rows += render_one(job, out, ropts)
        else:
            # a few meshes per task keeps process overhead low; map keeps input order (determinism)
            chunk = max(1, min(8, len(mine) // (workers * 4)))
            batches = [(mine[i:i + chunk], out, ropts) for i in range(0, len(mine), chunk)]
            with _pool_or_new(self.pool, workers) as pool:
                for part in progress.track(pool.map(_render_batch, batches), total=len(batches), desc="render"):
                    rows += part
        secs = time.time() - t0
        ok = sum(1 for r in rows if r["status"] == "ok")
        failed = sorted({r["sample_id"] for r in rows if r["status"] != "ok"})
        stats = {"meshes": len(mine), "views": len(rows), "ok_views": ok, "failed_meshes": len(failed),
                 "views_per_s": round(ok / secs, 2) if secs > 0 else None}
        return renders_table(rows, ropts, self.copied), stats


def default_workers(backend: str) -> int:
    """open3d: processes that render meshes (min(2, cores)); torch: processes that read meshes and
    write PNGs beside the one that renders (cores - 1, at most MAX_WORKERS)."""
    return min(MAX_WORKERS, max(1, usable_cores() - 1)) if backend == "torch" else min(2, usable_cores())


def worker_pool(backend: str = "auto", workers: int | None = None) -> ProcessPoolExecutor:
    """A pool for RenderJob(pool=...) that a caller keeps for many runs (spawned workers import
    rl3d once instead of once per run)."""
    backend, _ = resolve_engine(backend, None)
    return process_pool(workers or default_workers(backend))


@contextmanager
def _pool_or_new(pool, workers: int):
    """The caller's pool (left running), else a new one shut down on leaving."""
    if pool is not None:
        yield pool
        return
    with process_pool(workers) as new:
        yield new


def run_render(samples, opts, views: int = 6, preset: str = "default", elevation: float = DEFAULT_ELEVATION,
               resolution: int = 512, background="white", fov: float = DEFAULT_FOV, depth: bool = False,
               normals: bool = False, sheet: bool = True, framing: str = "object",
               workers: int | None = None, backend: str = "auto", device: str | None = None,
               supersample: int = 2, skip_back_faces: bool = True) -> dict:
    """Render every mesh of `samples` (table or GLB dir) owned by opts.shard into opts.out.

    open3d backend: `workers` processes render meshes in parallel (default min(2, cores)).
    torch backend: this process renders batches of many meshes at once on the device (one CUDA
    context) while `workers` processes (default cores - 1, at most 16; threads for fewer than
    MIN_JOBS_FOR_PROCESSES meshes) read the meshes and write the PNGs."""
    return RenderJob(samples, views, preset, elevation, resolution, background, fov, depth, normals, sheet, framing,
                     workers, backend, device, supersample, skip_back_faces=skip_back_faces).run(opts)
