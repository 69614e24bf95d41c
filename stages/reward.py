"""`rl3d reward`: score samples (gen output, or synth objects for reference scoring) with the
terms a reward config lists for each sample's level, into the "rewards" table.

Per term T the table holds T (weight * scale * raw), T_raw (the raw value, aggregated over views),
T_views (raw per-view scores, for audit), T_status, T_message and T_details (JSON). Per row:
`total` = sum of the level's weighted terms; `status` "ok" only when every term of the level is
"ok" or "not_applicable" (not_applicable terms add nothing and are listed in `message`). A failed
term is never replaced by a number: a failed required term makes `total` null and `status`
"<term status>:<term name>"; failed optional terms leave the total of the others with status
"partial". The Hi-GRPO back-flow R_high + lambda * R_low is not applied here (rl-step does it).

A sample with a textured mesh (gen --texture-hook: `textured_path`) is scored on that mesh: mesh
terms read it, view terms need renders of it (render records `mesh_source`; renders of the other
mesh are "stale_renders"), and the table's `mesh_source` column (only for such samples tables)
says which mesh each row was scored on: "textured" or "mesh".
"""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rl3d.formats import shards as shards_io
from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.formats.shards import Shard
from rl3d.formats.voxels import from_bytes
from rl3d.stages.codecs import load_codec
from rl3d.stages.contract import Job, Progress, StageOptions, process_pool, status_counts, timed, usable_cores
from rl3d.stages.rewards.base import RewardItem, TermResult
from rl3d.stages.rewards.reward_config import RewardConfig, TermConfig, backend_class, load_config, make_backend

OK_STATES = ("ok", "not_applicable")
MAX_WORKERS = 16
MIN_ITEMS_FOR_PROCESSES = 256         # fewer (term, sample) pairs: starting processes costs more than it saves
_BACKEND_CACHE: dict[str, object] = {}  # one instance per (backend, options) per process


def get_backend(term: TermConfig):
    key = term.backend_key()
    if key not in _BACKEND_CACHE:
        _BACKEND_CACHE[key] = make_backend(term)
    return _BACKEND_CACHE[key]


# ---- inputs ---------------------------------------------------------------------------------

def read_scored_rows(path) -> tuple[pa.Table, str]:
    """A gen samples table or a synth objects table -> (table, kind)."""
    first = tables.list_parts(path)[0]
    try:
        names = pq.read_schema(first).names
    except Exception as e:
        raise InputError(f"{first}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    kind = "samples" if "sample_index" in names else "objects" if "voxels" in names else None
    if kind is None:
        raise InputError(f"{first}: neither a samples table (no 'sample_index') nor an objects table (no 'voxels')")
    table = tables.read_table(path, kind)
    tables.require_rows(table, str(path), kind)
    tables.require_unique(table, ("sample_id",), str(path))  # rewards join on it
    return table, kind


def group_renders(path, wanted: set[str]) -> dict[str, list[dict]]:
    """sample_id -> its render rows sorted by view."""
    t = tables.read_table(path, "renders", columns=None)
    tables.require_unique(t, ("sample_id", "view"), str(path))
    names = ("sample_id", "view", "image_path", "status", "message", "mesh_source")
    cols = {c: t.column(c).to_pylist() for c in names if c in t.column_names}
    out: dict[str, list[dict]] = defaultdict(list)
    for i, sid in enumerate(cols["sample_id"]):
        if sid in wanted:
            out[sid].append({c: cols[c][i] for c in cols})
    for rows in out.values():
        rows.sort(key=lambda r: r["view"])
    return out


def render_state(rows: list[dict], mesh_source: str | None = None) -> tuple[str, str, list[str]]:
    """(status, message, image paths) of one sample's renders; `mesh_source`: the mesh the sample
    is scored on ("textured" or "mesh"; None: no textured meshes in the samples table), which
    renders that record theirs must show."""
    if not rows:
        return "missing_renders", "no render rows for this sample", []
    bad = [r for r in rows if r["status"] != "ok" or not r["image_path"]]
    if bad:
        return "render_error", f"view {bad[0]['view']}: {bad[0]['status']}: {bad[0]['message'] or ''}".strip(), []
    shown = rows[0].get("mesh_source") or "mesh"
    if mesh_source is not None and shown != mesh_source:
        return "stale_renders", f"the renders show the sample's {shown} mesh, it is scored on its {mesh_source} " \
                                "mesh: render the samples again", []
    return "ok", "", [r["image_path"] for r in rows]


def mesh_sources(rows: dict[str, list]) -> list[str] | None:
    """Per row the mesh it is scored on: "textured" where gen's texture hook made one, else
    "mesh"; None when the table has no textured_path column (no column is written then)."""
    if "textured_path" not in rows:
        return None
    return ["textured" if p else "mesh" for p in rows["textured_path"]]


def decode_grids(rows: dict[str, list], kind: str, codec_path: str) -> tuple[list, list[str]]:
    """Per row: the voxel grid (or None) and a decode error message ('' when fine)."""

    n = len(rows["sample_id"])
    grids: list = [None] * n
    errors = [""] * n
    if kind == "objects":
        for i, blob in enumerate(rows["voxels"]):
            try:
                grids[i] = from_bytes(blob)
            except (ValueError, TypeError) as e:
                errors[i] = f"voxels: {e}"
        return grids, errors

    codec = load_codec(codec_path or None)  # the block codec or the 64^3 VQ-VAE (stages/codecs)
    good = [i for i, t in enumerate(rows["mesh_tokens"])
            if rows["status"][i] == "ok" and t is not None and len(t) == codec.seq_len]
    for i, t in enumerate(rows["mesh_tokens"]):
        if rows["status"][i] == "ok" and i not in set(good):
            errors[i] = f"expected {codec.seq_len} mesh tokens, got {0 if t is None else len(t)}"
    if good:
        toks = np.asarray([rows["mesh_tokens"][i] for i in good], np.int64)
        in_range = (toks >= 0).all(1) & (toks < codec.vocab_size).all(1)
        ok = [i for i, g in zip(good, in_range) if g]
        for i, g in zip(good, in_range):
            if not g:
                errors[i] = f"mesh token ids outside [0, {codec.vocab_size})"
        if ok:
            decoded = codec.decode_batch(toks[in_range])
            for i, g in zip(ok, decoded):
                grids[i] = g
    return grids, errors


# ---- scoring --------------------------------------------------------------------------------

def aggregate(res: TermResult, how: str) -> tuple[float | None, list[float] | None, str, str]:
    """A backend result -> (raw value, per-view scores, status, message)."""
    views = None if res.per_view is None else [None if v is None else float(v) for v in res.per_view]
    if res.status != "ok":
        return None, views, res.status, res.message or ""
    if views is None:
        if res.value is None:
            return None, None, "backend_error", "backend returned status ok without a value"
        raw = float(res.value)
    elif how == "none":
        if res.value is None:
            return None, views, "config_error", "backend scores views: aggregate must be max, mean or min"
        raw = float(res.value)
    else:
        vals = [v for v in views if v is not None and math.isfinite(v)]
        if len(vals) != len(views) or not vals:
            return None, views, "view_error", f"{len(views) - len(vals)} of {len(views)} views have no finite score"
        raw = float({"max": np.max, "mean": np.mean, "min": np.min}[how](vals))
    if not math.isfinite(raw):
        return None, views, "nan_score", f"raw value {raw}"
    return raw, views, "ok", res.message or ""


def score_term(term: TermConfig, backend, items: list[RewardItem], batch: int) -> list[TermResult]:
    """Score items in batches; an exception or a wrong-length answer fails that batch's items."""
    out: list[TermResult] = []
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        try:
            res = backend.score(chunk)
            if len(res) != len(chunk):
                raise RuntimeError(f"returned {len(res)} results for {len(chunk)} items")
        except InputError:
            raise
        except Exception as e:  # the backend's failure is the rows' status, never a number
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            res = [TermResult(status="backend_error", message=msg) for _ in chunk]
        out.extend(res)
    return out


def _score_in_worker(term: TermConfig, items: list[RewardItem], batch: int) -> tuple[list[TermResult], float]:
    """score_term in a worker process (its backend built once per process), with its seconds."""
    t0 = time.perf_counter()
    return score_term(term, get_backend(term), items, batch), time.perf_counter() - t0


def combine(terms: list[TermConfig], cells: dict[str, dict]) -> tuple[float | None, str, str]:
    """A row's (total, status, message) from its terms' cells."""
    failed = [t for t in terms if cells[t.name]["status"] not in OK_STATES]
    na = [t.name for t in terms if cells[t.name]["status"] == "not_applicable"]
    notes = [f"{t.name}: {cells[t.name]['status']}: {cells[t.name]['message']}".rstrip(": ") for t in failed]
    if na:
        notes.append("not_applicable: " + ", ".join(na))
    message = "; ".join(notes)
    req = [t for t in failed if t.required]
    if req:
        return None, f"{cells[req[0].name]['status']}:{req[0].name}", message
    scored = [cells[t.name]["value"] for t in terms if cells[t.name]["status"] == "ok"]
    if not scored:
        return None, "no_applicable_terms", message
    return float(sum(scored)), ("partial" if failed else "ok"), message


def reward_table(rows: dict[str, list], kind: str, config: RewardConfig, renders: dict[str, list[dict]] | None,
                 progress: Progress, stats: dict, batch: int = 64, codec: str | None = None,
                 pool: ProcessPoolExecutor | None = None) -> pa.Table:
    """`codec`: the codec to decode mesh tokens with when the config names none (gen records the
    path of an external codec, e.g. the 64^3 VQ-VAE, in the samples table's config). `pool`: the
    caller's worker pool for the host terms (kept running), else one is started when it pays."""
    n = len(rows["sample_id"])
    levels = rows["level"]
    grids, decode_err = decode_grids(rows, kind, config.codec or codec or "")
    sources = mesh_sources(rows)
    rstate = [render_state(renders.get(sid, []), sources and sources[i]) if renders is not None
              else ("missing_renders", "no --renders given", []) for i, sid in enumerate(rows["sample_id"])]
    meshes = [(rows.get("textured_path") or [None] * n)[i] or rows["mesh_path"][i] or None for i in range(n)]
    items = [RewardItem(sample_id=rows["sample_id"][i], prompt=rows["prompt"][i], level=levels[i],
                        image_paths=rstate[i][2], mesh_path=meshes[i], grid=grids[i],
                        spec=_parse_spec(rows.get("spec", [None] * n)[i]),
                        category=rows.get("category", [None] * n)[i],
                        reasoning=rows.get("reasoning", rows.get("plan", [""] * n))[i] or "")
             for i in range(n)]
    row_status = [rows["status"][i] if rows["status"][i] != "ok" else ("decode_error" if decode_err[i] else "ok")
                  for i in range(n)]
    row_msg = [decode_err[i] or (rows["message"][i] or "") for i in range(n)]

    names = config.term_names()
    cells: list[dict[str, dict]] = [{} for _ in range(n)]
    jobs = [(lvl, t) for lvl in config.levels for t in config.terms(lvl)]
    # the terms whose backend declares host_workers (model-free: geometry, spec) go to worker processes,
    # when there are enough samples, while this process scores the model terms (CLIP on the GPU): the same values
    on_host = {t.backend for _, t in jobs if backend_class(t.backend).host_workers}
    host_items = sum(levels.count(lvl) for lvl, t in jobs if t.backend in on_host)
    cores = usable_cores()
    own_pool = pool is None and host_items >= MIN_ITEMS_FOR_PROCESSES and cores > 2
    if own_pool:
        pool = process_pool(min(MAX_WORKERS, cores - 1))
    scored: list = []            # (level, term, row indices to score), in config order
    pending: dict[int, list] = {}  # scored index -> futures of its batches in worker processes
    for lvl, term in jobs:
        idx = [i for i in range(n) if levels[i] == lvl]
        if not idx:
            continue
        backend = get_backend(term)
        views = backend.needs_views
        run = []
        for i in idx:
            if row_status[i] != "ok":
                cells[i][term.name] = _cell(None, None, "skipped", f"sample {row_status[i]}")
            elif views and rstate[i][0] != "ok":
                cells[i][term.name] = _cell(None, None, rstate[i][0], rstate[i][1])
            else:
                run.append(i)
        scored.append((lvl, term, run))
        if pool is not None and term.backend in on_host and run:  # scored in worker processes meanwhile
            pending[len(scored) - 1] = [pool.submit(_score_in_worker, term, [items[i] for i in run[s:s + batch]], batch)
                                        for s in range(0, len(run), batch)]
    try:
        for k, (lvl, term, run) in progress.track(list(enumerate(scored)), total=len(scored), desc="reward terms"):
            if k in pending:
                parts = [f.result() for f in pending[k]]
                results = [r for part, _ in parts for r in part]
                stats[f"seconds_{lvl}_{term.name}"] = round(sum(sec for _, sec in parts), 3)  # worker seconds
            else:
                with timed(stats, f"seconds_{lvl}_{term.name}"):
                    results = score_term(term, get_backend(term), [items[i] for i in run], batch) if run else []
            for i, res in zip(run, results):
                raw, pv, st, msg = aggregate(res, term.aggregate)
                cells[i][term.name] = _cell(raw, pv, st, msg, term.factor, res.details)
    finally:
        if own_pool:
            pool.shutdown(cancel_futures=True)

    cols: dict[str, list] = {"sample_id": rows["sample_id"], "prompt_id": rows["prompt_id"],
                             "sample_index": rows["sample_index"], "level": levels,
                             "total": [], "status": [], "message": []}
    for i in range(n):
        terms = config.terms(levels[i])
        if row_status[i] != "ok":
            total, st, msg = None, row_status[i], row_msg[i]
        else:
            total, st, msg = combine(terms, cells[i])
        cols["total"].append(total)
        cols["status"].append(st)
        cols["message"].append(msg)
    arrays = {k: pa.array(v, tables.SCHEMAS["rewards"][1][k]) for k, v in cols.items()}
    if sources is not None:  # only for samples tables that can hold textured meshes: default outputs unchanged
        arrays["mesh_source"] = pa.array(sources, pa.string())
    for name in names:
        c = [cells[i].get(name) for i in range(n)]
        arrays[name] = pa.array([x and x["value"] for x in c], pa.float64())
        arrays[f"{name}_raw"] = pa.array([x and x["raw"] for x in c], pa.float64())
        arrays[f"{name}_views"] = pa.array([x and x["views"] for x in c], pa.list_(pa.float64()))
        arrays[f"{name}_status"] = pa.array([x and x["status"] for x in c], pa.string())
        arrays[f"{name}_message"] = pa.array([x and x["message"] for x in c], pa.string())
        arrays[f"{name}_details"] = pa.array([x and x["details"] for x in c], pa.string())
    return pa.table(arrays)


def _cell(raw, views, status, message, factor=1.0, details=None) -> dict:
    return {"raw": raw, "value": None if raw is None else raw * factor, "views": views, "status": status,
            "message": message, "details": json.dumps(details, sort_keys=True, default=str) if details else None}


def _parse_spec(v):
    if v is None or v == "":
        return None
    if isinstance(v, dict):
        return v
    try:
        d = json.loads(v)
    except (TypeError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def load_rows(table: pa.Table, kind: str, shard: Shard) -> dict[str, list]:
    """Columns as lists for the rows this shard owns; objects get level 'single', sample_index 0."""
    keep = [i for i, p in enumerate(table.column("prompt_id").to_pylist()) if shard.owns(p)]
    t = table.take(pa.array(keep, pa.int64()))
    want = ["sample_id", "prompt_id", "prompt", "mesh_tokens", "mesh_path", "textured_path", "status", "message",
            "sample_index", "level", "voxels", "spec", "category", "reasoning", "plan"]
    rows = {c: t.column(c).to_pylist() for c in want if c in t.column_names}
    if kind == "objects":
        rows["sample_index"] = [0] * t.num_rows
        rows["level"] = ["single"] * t.num_rows
    return rows


def check_levels(rows: dict[str, list], config: RewardConfig, source: str) -> None:
    counts: dict[str, int] = defaultdict(int)
    for lvl in rows["level"]:
        counts[lvl] += 1
    for lvl, c in counts.items():
        if not config.terms(lvl):
            hint = " (use a flat preset such as flat or paper-flat)" if lvl == "single" else ""
            raise InputError(f"{source}: {c} rows have level {lvl!r} but config {config.name!r} has no "
                             f"terms for it{hint}")


class RewardJob(Job):
    """Scores of a samples (or objects) table under a reward config. `pool`: a process pool the
    caller keeps across runs for the model-free terms (the resident loop), instead of one per run.
    Backends (CLIP, judges) are built once per process and stay loaded (get_backend)."""

    stage, kind = "reward", "rewards"

    def __init__(self, samples: str | Path, renders: str | Path | None, config: str, batch: int = 64,
                 progress: Progress | None = None, pool=None, allow_unverified: bool = False):
        if batch < 1:
            raise InputError(f"--batch {batch}: must be >= 1")
        self.samples, self.renders, self.batch, self.pool = samples, renders, batch, pool
        self.cfg = load_config(config)
        self._config = {"reward": self.cfg.to_dict(), "samples": str(samples),
                        "renders": str(renders) if renders else None}
        read_scored_rows(samples)  # what the table is, first: a table of another kind is named as such
        self._made_from = check_inputs(samples, renders, progress or Progress(quiet=True), allow_unverified)
        self.policy = tables.table_policy(samples)

    def config(self) -> dict:
        return self._config

    def made_from(self):
        return self._made_from

    def run(self, opts: StageOptions) -> dict:
        shards_io.check_out_apart(opts.out, {"--samples": self.samples, "--renders": self.renders})
        return super().run(opts)

    def produce(self, shard: Shard, progress: Progress):
        samples, renders, cfg = self.samples, self.renders, self.cfg
        stats: dict = {}
        table, kind = read_scored_rows(samples)
        rows = load_rows(table, kind, shard)
        progress.log(f"reward: {len(rows['sample_id'])} samples, config {cfg.name!r}: loading the backends")
        check_levels(rows, cfg, str(samples))
        # every backend is built before any scoring so that a bad option fails fast
        for lvl in cfg.levels:
            for t in cfg.terms(lvl):
                if lvl in set(rows["level"]):
                    get_backend(t)
        rgroups = group_renders(renders, set(rows["sample_id"])) if renders else None
        codec = tables.table_config(samples).get("codec") if kind == "samples" else None
        out = reward_table(rows, kind, cfg, rgroups, progress, stats, self.batch, codec=codec, pool=self.pool)
        stats["status"] = status_counts(out)
        return out, stats


def run(samples: str | Path, renders: str | Path | None, config: str, opts: StageOptions, batch: int = 64,
        allow_unverified: bool = False) -> dict:
    return RewardJob(samples, renders, config, batch, Progress(opts.quiet), allow_unverified=allow_unverified).run(opts)


def host_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """A pool for RewardJob(pool=...) that a caller keeps for many runs."""
    return process_pool(workers or max(1, min(MAX_WORKERS, usable_cores() - 1)))


def check_inputs(samples, renders, progress: Progress, allow_unverified: bool = False) -> dict[str, str | None]:
    """Refuse renders of other samples (another run, seed or policy); the ids the rewards are made from."""
    source = tables.provenance(samples)
    made_from = {"samples": source.table_id}
    if renders:
        rendered = tables.provenance(renders)
        warning = tables.require_made_for(rendered, "samples", source, allow_unverified)
        if warning:
            progress.log(f"WARNING: {warning}")
        made_from["renders"] = rendered.table_id
    return made_from
