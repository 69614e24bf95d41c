"""`rl3d eval`: score policies on a benchmark and write a report people read.

For each policy: gen (its final level: "fine" for Hi-GRPO policies, "single" for flat ones) into
OUT/<policy>/gen, render of the final-level meshes into OUT/<policy>/renders (both through the
stage functions, so the stage contract's resumability applies: a rerun skips finished work),
then the metrics of stages/scoring/metrics.py per category and overall. Reference renders (for KD/FD)
come from --references, the benchmark file's reference_dir column, or, for benchmarks with specs
(synth-reasoning), from rendering the ground-truth grids into OUT/references once.

Outputs: OUT/metrics/part-*.parquet (a `metrics` table: name, value + policy, category, metric,
n, std, status, message, higher_is_better, ...), OUT/<policy>/per_sample.parquet, and the report
(OUT/report.md, OUT/report.html, OUT/plots/*.png) from stages/scoring/report.py.

A metric that cannot be computed is a row with status "skipped" and the reason, never a zero.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transformers.utils import logging as hf_logging

from rl3d.formats import shards as shards_io
from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.formats.glb import write_glb
from rl3d.formats.voxels import grid_to_mesh, voxel_iou
from rl3d.stages.eval_sets import Benchmark, load_benchmark, reference_images
from rl3d.stages.contract import Progress, StageOptions
from rl3d.stages.gen import MODES, run_gen
from rl3d.stages.policy.checkpoint import load_codec_for, read_policy_meta, sft_step_of
from rl3d.stages.render import run_render
from rl3d.stages.rewards import geometry
from rl3d.stages.rewards.spec import check_spec
from rl3d.stages.scoring import registry
from rl3d.stages.scoring.clip import ClipScorer, default_scorer_dir
from rl3d.stages.scoring.metrics import (KD_SCALE, FeatureModel, frechet_distance, kernel_distance, mean_rbf_kernel,
                                         mean_std, model_fingerprint, pairwise_iou_mean, rate)
from rl3d.stages.scoring.report import ReportContext, pick_grid, write_report

METRIC_GROUPS = ("decode", "clip", "kd", "fd", "spec", "geometry", "diversity", "reference_iou")
# computed only when named in --metrics: the paper's "KD" (a mean RBF similarity, for placing numbers beside
# its published table; rl3d's KD is kd_x100)
OPTIONAL_GROUPS = ("kd_paper",)
FEATURE_GROUPS = {"kd", "fd", "kd_paper"}  # the groups that need the feature model and reference renders
ALL = "all"  # the category value of overall rows
GEOMETRY_RATES = ("single_component_rate", "grounded_rate", "stable_rate", "watertight_rate")


@dataclass
class EvalOptions:
    bench: str
    policies: list[str]
    out: Path
    references: str | None = None
    metrics: tuple[str, ...] = METRIC_GROUPS
    samples_per_prompt: int = 4
    limit: int | None = None             # prompts per category
    feature_model: str | None = None
    clip_model: str | None = None
    seed: int = 0
    mode: str = "auto"                   # "auto" | "hi-grpo" | "flat"
    views: int = 6
    resolution: int = 256
    supersample: int = 2                 # render anti-aliasing: K x K rays per pixel
    device: str | None = None
    batch_size: int = 32
    kd_subsets: int = 100
    kd_subset_size: int = 1000
    grid_prompts: int = 6
    workers: int | None = None           # render processes (None: the render stage's default)
    runs: list[str] = field(default_factory=list)
    overwrite: bool = False
    quiet: bool = False


# ---------------------------------------------------------------- metric rows

def metric_row(policy: str, category: str, metric: str, value=None, n: int = 0, std=None,
               status: str = "ok", message: str = "", **extra) -> dict:
    value = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    if status == "ok" and value is None:
        status, message = "skipped", message or "no value"
    return {"name": f"{category}/{metric}", "value": value, "policy": policy, "category": category,
            "metric": metric, "n": int(n), "std": None if std is None or not np.isfinite(std) else float(std),
            "status": status, "message": message, "higher_is_better": registry.direction(metric),
            **extra}


def skipped(policy: str, categories: list[str], metric: str, reason: str) -> list[dict]:
    return [metric_row(policy, c, metric, status="skipped", message=reason) for c in [ALL, *categories]]


METRIC_TYPES = {"name": pa.string(), "value": pa.float64(), "policy": pa.string(), "category": pa.string(),
                "metric": pa.string(), "n": pa.int64(), "std": pa.float64(), "status": pa.string(),
                "message": pa.string(), "higher_is_better": pa.bool_(), "policy_id": pa.string(),
                "bench": pa.string(), "feature_model": pa.string()}


def metrics_table(rows: list[dict]) -> pa.Table:
    return pa.table({c: pa.array([r.get(c) for r in rows], t) for c, t in METRIC_TYPES.items()})


# ---------------------------------------------------------------- per-sample records -> metrics

@dataclass
class Sample:
    """One final-level sample of a policy, as the metrics need it."""
    sample_id: str
    prompt_id: str
    category: str
    prompt: str
    status: str                     # the samples table's status ("ok", "decode_error", ...)
    message: str = ""
    grid: np.ndarray | None = None
    views: list[str] = field(default_factory=list)   # rendered view paths (ok renders only)
    spec: dict | None = None


@dataclass
class Models:
    clip: ClipScorer | None = None
    clip_reason: str = ""
    features: FeatureModel | None = None
    features_reason: str = ""
    batch_size: int = 32            # views per forward pass of the CLIP scorer


def compute_metrics(policy: str, samples: list[Sample], categories: list[str], groups, models: Models,
                    references: dict[str, list[str]] | None, reference_grids: dict[str, np.ndarray] | None = None,
                    kd_subsets: int = 100, kd_subset_size: int = 1000, seed: int = 0,
                    reference_features: np.ndarray | None = None, progress: Progress | None = None
                    ) -> tuple[list[dict], list[dict]]:
    """All requested metric groups for one policy -> (metric rows, per-sample rows)."""
    progress = progress or Progress(quiet=True)
    groups = set(groups)
    rows: list[dict] = []
    per = {s.sample_id: {"sample_id": s.sample_id, "prompt_id": s.prompt_id, "category": s.category,
                         "status": s.status, "message": s.message} for s in samples}
    by_cat = {c: [s for s in samples if s.category == c] for c in categories}
    scopes = [(ALL, samples)] + [(c, by_cat[c]) for c in categories]
    ok = [s for s in samples if s.status == "ok" and s.grid is not None]

    if "decode" in groups:
        for c, ss in scopes:
            v, n = rate([s.status != "ok" for s in ss])
            rows.append(metric_row(policy, c, "decode_failure_rate", v, n,
                                   message="" if n else "no samples"))

    if "clip" in groups:
        rows += _clip_rows(policy, scopes, models, per, progress)

    if FEATURE_GROUPS & groups:
        rows += _distribution_rows(policy, scopes, groups, models, references, kd_subsets, kd_subset_size,
                                   seed, reference_features, progress)

    if "spec" in groups:
        rows += _spec_rows(policy, scopes, categories, ok, per)

    if "geometry" in groups:
        rows += _geometry_rows(policy, scopes, ok, per)

    if "diversity" in groups:
        for c, ss in scopes:
            vals = []
            for pid in dict.fromkeys(s.prompt_id for s in ss):
                grids = [s.grid for s in ss if s.prompt_id == pid and s.status == "ok" and s.grid is not None]
                if len(grids) >= 2:
                    vals.append(pairwise_iou_mean(np.stack(grids)))
            m, sd, n = mean_std(vals)
            rows.append(metric_row(policy, c, "diversity_iou", m, n, sd,
                                   message="" if n else "diversity skipped: no prompt has 2 decoded samples "
                                                        "(use --samples-per-prompt >= 2)"))

    if "reference_iou" in groups:
        if not reference_grids:
            rows += skipped(policy, categories, "reference_iou", "reference IoU skipped: the benchmark has "
                            "no ground-truth grids (only spec benchmarks such as synth-reasoning do)")
        else:
            for s in ok:
                if s.prompt_id in reference_grids:
                    per[s.sample_id]["reference_iou"] = voxel_iou(*same_resolution(s.grid, reference_grids[s.prompt_id]))
            for c, ss in scopes:
                m, sd, n = mean_std([per[s.sample_id].get("reference_iou") for s in ss])
                rows.append(metric_row(policy, c, "reference_iou", m, n, sd,
                                       message="" if n else "no decoded samples"))
    return rows, list(per.values())


def same_resolution(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two grids of the unit cube (both in rl3d's frame) at the finer one's resolution, the coarser
    one's voxels repeated: a 64^3 VQ-VAE sample against a benchmark's 32^3 ground truth."""
    hi = max(a.shape[0], b.shape[0])
    if hi % a.shape[0] or hi % b.shape[0]:
        raise ValueError(f"grids of {a.shape[0]}^3 and {b.shape[0]}^3 voxels have no common resolution")
    return tuple(g if g.shape[0] == hi else g.repeat(hi // g.shape[0], 0).repeat(hi // g.shape[0], 1)
                 .repeat(hi // g.shape[0], 2) for g in (a, b))


def _clip_rows(policy, scopes, models: Models, per, progress) -> list[dict]:
    cats = [c for c, _ in scopes[1:]]
    if models.clip is None:
        return skipped(policy, cats, "clip_score", f"CLIP score skipped: {models.clip_reason}")
    scored = [s for _, ss in scopes[:1] for s in ss if s.views]
    if not scored:
        return skipped(policy, cats, "clip_score", "CLIP score skipped: no rendered views")
    progress.log(f"eval {policy}: CLIP score of {len(scored)} samples")
    values = models.clip.score([s.prompt for s in scored], [s.views for s in scored], batch_size=models.batch_size)
    for s, v in zip(scored, values):
        per[s.sample_id]["clip_score"] = v
    out = []
    for c, ss in scopes:
        m, sd, n = mean_std([per[s.sample_id].get("clip_score") for s in ss])
        out.append(metric_row(policy, c, "clip_score", m, n, sd, message="" if n else "no rendered samples"))
    return out


def _distribution_rows(policy, scopes, groups, models: Models, references, kd_subsets, kd_subset_size, seed,
                       reference_features, progress) -> list[dict]:
    cats = [c for c, _ in scopes[1:]]
    wanted = [m for g, m in (("kd", "kd_x100"), ("fd", "fd"), ("kd_paper", "kd_paper")) if g in groups]
    reason = None
    if models.features is None:
        reason = f"no feature model: {models.features_reason}"
    elif not references:
        reason = "no reference renders (pass --references DIR or a benchmark with reference_dir/specs)"
    if reason:
        return [r for m in wanted for r in skipped(policy, cats, m, f"{m.split('_')[0].upper()} skipped: {reason}")]
    fname = models.features.name
    gen_paths = [(s.category, p) for s in scopes[0][1] for p in s.views]
    progress.log(f"eval {policy}: features of {len(gen_paths)} generated views ({fname})")
    gen = models.features.features([p for _, p in gen_paths]) if gen_paths else np.zeros((0, 1))
    gen_cat = np.array([c for c, _ in gen_paths])
    if reference_features is None:
        reference_features = reference_feature_matrix(models, references,
                                                      {s.prompt_id: s.category for s in scopes[0][1]})
    ref_feats, ref_cat = reference_features
    out = []
    for c, _ in scopes:
        x = gen if c == ALL else gen[gen_cat == c] if len(gen_cat) else gen
        y = ref_feats if c == ALL else ref_feats[ref_cat == c]
        for m in wanted:
            if len(x) < 2 or len(y) < 2:
                out.append(metric_row(policy, c, m, status="skipped", n=len(x), feature_model=fname,
                                      message=f"{m.split('_')[0].upper()} skipped: needs >= 2 generated and >= 2 "
                                              f"reference views (have {len(x)} and {len(y)})"))
            elif m == "kd_x100":
                v, sd = kernel_distance(x, y, kd_subsets, kd_subset_size, seed)
                out.append(metric_row(policy, c, m, KD_SCALE * v, len(x), KD_SCALE * sd, feature_model=fname))
            elif m == "kd_paper":
                out.append(metric_row(policy, c, m, mean_rbf_kernel(y, x), len(x), feature_model=fname))
            else:
                out.append(metric_row(policy, c, m, frechet_distance(x, y), len(x), feature_model=fname))
    return out


def reference_feature_matrix(models: Models, references: dict[str, list[str]], category_of: dict[str, str]):
    """Features of every reference view -> (features[N, D], category[N])."""
    items = [(category_of[pid], p) for pid, paths in references.items() if pid in category_of for p in paths]
    feats = models.features.features([p for _, p in items]) if items else np.zeros((0, 1))
    return feats, np.array([c for c, _ in items])


SPEC_KINDS = ("nonempty", "grounded", "no_floating_parts", "silhouette", "hollow", "wireframe", "stable")


def spec_attribute_kind(name: str) -> str:
    """Group the checker's attribute names into a few readable kinds: colour checks ("color.seat")
    -> "color", family parameters read back by probes (legs, shelves, spots...) -> "params"."""
    if name.startswith("color"):
        return "color"
    return name if name in SPEC_KINDS else "params"


def spec_attributes(result) -> dict[str, float]:
    """check_spec's result (SpecResult: checks = [{attribute, passed, ...}]) -> attribute kind ->
    fraction of its checks passed."""
    checks = result.get("checks") if isinstance(result, dict) else getattr(result, "checks", None)
    if not isinstance(checks, list):
        raise TypeError(f"unexpected check_spec result {type(result).__name__}")
    kinds: dict[str, list[float]] = {}
    for c in checks:
        kinds.setdefault(spec_attribute_kind(str(c["attribute"])), []).append(float(bool(c["passed"])))
    return {k: float(np.mean(v)) for k, v in kinds.items()}


def _spec_rows(policy, scopes, categories, ok: list[Sample], per) -> list[dict]:
    with_spec = [s for s in ok if s.spec]
    if not any(s.spec for _, ss in scopes[:1] for s in ss):
        return skipped(policy, categories, "spec_accuracy", "spec accuracy skipped: the benchmark has no specs")
    for s in with_spec:
        try:
            result = check_spec(s.spec, s.grid)
            attrs = spec_attributes(result)
        except Exception as e:  # a checker failure is recorded per sample, not scored
            per[s.sample_id]["spec_status"] = f"spec_error: {type(e).__name__}: {e}"[:300]
            continue
        per[s.sample_id]["spec"] = attrs
        # the checker's own score: the fraction of all its checks passed
        per[s.sample_id]["spec_accuracy"] = float(getattr(result, "score", np.mean(list(attrs.values()))))
        per[s.sample_id]["spec_all_correct"] = bool(attrs) and all(v >= 1.0 for v in attrs.values())
    out = []
    for c, ss in scopes:
        checked = [per[s.sample_id] for s in ss if "spec" in per[s.sample_id]]
        # failed decodes count as wrong: a spec benchmark asks for an object, no object is not "unscored"
        failed = [s for s in ss if s.spec and s.status != "ok"]
        acc = [r["spec_accuracy"] for r in checked if r["spec_accuracy"] is not None] + [0.0] * len(failed)
        m, sd, n = mean_std(acc)
        errors = sum(1 for s in ss if "spec_status" in per[s.sample_id])
        note = "; ".join(x for x in (f"{len(failed)} undecodable samples count as 0" if failed else "",
                                     f"{errors} samples the checker failed on are not counted" if errors else "") if x)
        out.append(metric_row(policy, c, "spec_accuracy", m, n, sd, message=note or ("" if n else "no checked samples")))
        v, n2 = rate([r["spec_all_correct"] for r in checked] + [False] * len(failed))
        out.append(metric_row(policy, c, "spec_all_correct", v, n2, message=note or ("" if n2 else "no checked samples")))
        attrs = sorted({a for r in checked for a in r["spec"]})
        for a in attrs:
            m, sd, n = mean_std([r["spec"][a] for r in checked if a in r["spec"]])
            out.append(metric_row(policy, c, f"spec_accuracy:{a}", m, n, sd))
    return out


def geometry_flags(grid: np.ndarray) -> dict[str, bool]:
    """Binary geometry outcomes of one decoded grid (from the geometry reward's measures)."""
    occ = grid > 0
    if not occ.any():
        return {k: False for k in GEOMETRY_RATES}
    return {"single_component_rate": geometry.largest_component(occ)[1]["components"] == 1,
            "grounded_rate": geometry.ground_contact(occ)[1]["gap_layers"] == 0,
            "stable_rate": geometry.stability(occ)[1]["outside_by"] == 0.0,
            "watertight_rate": geometry.watertight(occ)[1]["non_manifold_edges"] == 0}


def _geometry_rows(policy, scopes, ok: list[Sample], per) -> list[dict]:
    for s in ok:
        per[s.sample_id].update(geometry_flags(s.grid))
    out = []
    for c, ss in scopes:
        for m in GEOMETRY_RATES:
            v, n = rate([per[s.sample_id].get(m) for s in ss])
            out.append(metric_row(policy, c, m, v, n, message="over decoded samples" if n else "no decoded samples"))
    return out


# ---------------------------------------------------------------- the pipeline

def policy_names(dirs: list[str]) -> list[str]:
    """Readable unique names: the dir's base name, disambiguated by its parent when names clash."""
    base = [Path(d).resolve().name for d in dirs]
    names = []
    for i, d in enumerate(dirs):
        n = base[i] if base.count(base[i]) == 1 else f"{Path(d).resolve().parent.name}-{base[i]}"
        while n in names:
            n += f"-{i}"
        names.append(n)
    return names


def resolve_mode(policy_dir: Path, mode: str) -> str:
    """auto: the policy's own rl3d_policy.json `mode` when it says "flat"/"hi-grpo", else hi-grpo."""
    if mode in ("hi-grpo", "flat"):
        return mode
    if mode != "auto":
        raise InputError(f"--mode {mode!r}: expected auto, hi-grpo or flat")
    meta = read_policy_meta(policy_dir)
    return meta.get("mode") if meta.get("mode") in ("hi-grpo", "flat") else "hi-grpo"


def write_prompts(bench: Benchmark, out: Path) -> Path:
    """The exact prompt list, named by its content hash (a changed list never reuses old gen output)."""
    p = out / f"prompts-{bench.content_hash()}.jsonl"
    if not p.exists():
        keep = ("prompt_id", "prompt", "category", "spec", "family")
        shards_io.atomic_write_bytes(p, "".join(json.dumps({k: r[k] for k in keep if r.get(k) is not None}) + "\n"
                                                for r in bench.prompts).encode())
    return p


def _stage_opts(opts: EvalOptions, out: Path) -> StageOptions:
    return StageOptions(out=out, seed=opts.seed, overwrite=opts.overwrite, quiet=opts.quiet)


def _render(samples_path: Path, out: Path, opts: EvalOptions) -> None:
    run_render(str(samples_path), _stage_opts(opts, out), views=opts.views, resolution=opts.resolution, sheet=False,
               workers=opts.workers, supersample=opts.supersample)


def _views_by_sample(renders_dir: Path) -> dict[str, list[str]]:
    t = tables.read_table(renders_dir, "renders").to_pylist()
    views: dict[str, list[tuple[int, str]]] = {}
    for r in t:
        if r["status"] == "ok" and r["image_path"]:
            views.setdefault(r["sample_id"], []).append((r["view"], r["image_path"]))
    return {k: [p for _, p in sorted(v)] for k, v in views.items()}


def reference_renders(bench: Benchmark, opts: EvalOptions, progress: Progress) -> tuple[dict[str, list[str]], str]:
    """prompt_id -> reference view paths, and where they came from ("" when there are none)."""
    if opts.references:
        return _references_from(Path(opts.references), bench), str(opts.references)
    rows = [r for r in bench.prompts if r.get("reference_dir")]
    if rows:
        return {r["prompt_id"]: reference_images(r["reference_dir"]) for r in rows}, "the benchmark's reference_dir column"
    if not bench.has_specs:
        return {}, ""
    # ground-truth grids -> GLBs -> the same renderer and cameras as the generated samples
    ref = Path(opts.out) / "references"
    index = ref / f"objects-{bench.content_hash()}.parquet"
    if not index.exists():
        progress.log(f"eval: building {len(bench.prompts)} reference meshes from the benchmark's specs")
        rows = []
        for r in bench.prompts:
            rel = f"{shards_io.MESHES}/{r['prompt_id']}.glb"
            if not (ref / rel).exists():
                write_glb(grid_to_mesh(bench.reference_grid(r)), shards_io.inside(ref, rel))
            rows.append({"sample_id": r["prompt_id"], "prompt_id": r["prompt_id"], "mesh_path": rel,
                         "status": "ok", "message": "", "prompt": r["prompt"]})
        with shards_io.atomic_path(index) as tmp:
            pq.write_table(pa.Table.from_pylist(rows), tmp)
    _render(index, ref / "renders", opts)
    return _views_by_sample(ref / "renders"), "renders of the ground-truth grids (OUT/references)"


def _references_from(d: Path, bench: Benchmark) -> dict[str, list[str]]:
    """--references: a renders table dir (from `rl3d render`, keyed by prompt_id or sample_id) or a
    folder with one sub-folder of images per prompt_id."""
    if not d.is_dir():
        raise InputError(f"--references {d}: not a directory")
    if any(d.glob("*.parquet")):
        t = tables.read_table(d, "renders")
        key = "prompt_id" if "prompt_id" in t.column_names else "sample_id"
        out: dict[str, list[str]] = {}
        for r in t.to_pylist():
            if r["status"] == "ok" and r["image_path"]:
                out.setdefault(r[key], []).append(r["image_path"])
    else:
        out = {sub.name: reference_images(sub) for sub in sorted(d.iterdir()) if sub.is_dir()}
    wanted = {r["prompt_id"] for r in bench.prompts}
    out = {k: v for k, v in out.items() if k in wanted and v}
    if not out:
        raise InputError(f"--references {d}: no reference images for any prompt_id of the benchmark")
    return out


def load_models(opts: EvalOptions, groups) -> Models:
    models = Models(batch_size=opts.batch_size)
    if opts.quiet:  # --quiet means no progress output, transformers' weight-loading bars included
        hf_logging.disable_progress_bar()
    shipped = default_scorer_dir()
    clip_dir = opts.clip_model or (shipped if (shipped / "config.json").exists() else None)
    if "clip" in groups:
        if clip_dir is None:
            models.clip_reason = "no CLIP model (pass --clip-model DIR; the shipped scorer is not built)"
        else:
            models.clip = ClipScorer(clip_dir, device=opts.device or "cpu")
    if FEATURE_GROUPS & set(groups):
        fdir = opts.feature_model or clip_dir
        if fdir is None:
            models.features_reason = "pass --feature-model DIR (DINOv2 / CLIP dir, or an Inception TorchScript file)"
        else:
            models.features = FeatureModel.load(fdir, device=opts.device or "cpu")
    return models


def evaluate_policy(name: str, policy_dir: Path, bench: Benchmark, prompts_path: Path, opts: EvalOptions,
                    progress: Progress) -> tuple[list[Sample], dict]:
    """gen + render for one policy (resumable stage dirs) -> its final-level samples and info."""
    mode = resolve_mode(policy_dir, opts.mode)
    final = MODES[mode][-1]
    pdir = Path(opts.out) / name
    progress.log(f"eval {name}: gen ({mode}, final level {final!r}) into {pdir / 'gen'}")
    # sampling=None: as the policy's rl3d_policy.json says (e.g. a mesh-only policy's reasoning budget 0),
    # else gen's defaults
    gsum = run_gen(prompts_path, _stage_opts(opts, pdir / "gen"), policy_dir=policy_dir, mode=mode,
                   group_size=opts.samples_per_prompt, device=opts.device, sampling=None)
    samples = tables.read_table(pdir / "gen", "samples")
    rows = [r for r in samples.to_pylist() if r["level"] == final]
    final_path = pdir / "final_samples.parquet"
    keep = ["sample_id", "prompt_id", "sample_index", "level", "prompt", "mesh_path", "status", "message"]
    with shards_io.atomic_path(final_path) as tmp:
        pq.write_table(pa.Table.from_pylist([{k: r[k] for k in keep} for r in rows]), tmp)
    progress.log(f"eval {name}: render {len(rows)} {final} samples into {pdir / 'renders'}")
    _render(final_path, pdir / "renders", opts)
    views = _views_by_sample(pdir / "renders")

    meta = read_policy_meta(policy_dir)
    codec = load_codec_for(Path(policy_dir), meta)
    prompt_rows = {r["prompt_id"]: r for r in bench.prompts}
    out = []
    for r in rows:
        grid, status, message = None, r["status"], r["message"] or ""
        if status == "ok":
            try:
                grid = codec.decode(np.asarray(r["mesh_tokens"], np.int64))
            except ValueError as e:
                status, message = "decode_error", str(e)
        pr = prompt_rows.get(r["prompt_id"], {})
        out.append(Sample(r["sample_id"], r["prompt_id"], pr.get("category") or "uncategorized", r["prompt"],
                          status, message, grid, views.get(r["sample_id"], []),
                          json.loads(pr["spec"]) if pr.get("spec") else None))
    policy_id = rows[0]["policy_id"] if rows else tables.table_policy(pdir / "gen")
    info = {"name": name, "dir": str(Path(policy_dir).resolve()), "policy_id": policy_id, "mode": mode,
            "final_level": final, "sft_step": sft_step_of(meta),
            "rl_step": int(meta.get("rl_step", 0)), "base": meta.get("base"),
            "gen_config": tables.table_config(pdir / "gen"), "gen_skipped": bool(gsum.get("skipped"))}
    return out, info


def run_eval(opts: EvalOptions) -> dict:
    """The whole eval: benchmark -> per policy gen/render/metrics -> metrics table + report."""
    progress = Progress(opts.quiet)
    unknown = set(opts.metrics) - set(METRIC_GROUPS + OPTIONAL_GROUPS)
    if unknown:
        raise InputError(f"--metrics: unknown {', '.join(sorted(unknown))} "
                         f"(choose from {', '.join(METRIC_GROUPS + OPTIONAL_GROUPS)})")
    if not opts.policies:
        raise InputError("--policy: give at least one policy directory")
    if opts.samples_per_prompt < 1:
        raise InputError("--samples-per-prompt must be >= 1")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = load_benchmark(opts.bench, opts.limit)
    prompts_path = write_prompts(bench, out)
    categories = bench.categories
    models = load_models(opts, opts.metrics)
    refs, ref_source = ({}, "") if not FEATURE_GROUPS & set(opts.metrics) else reference_renders(bench, opts, progress)
    ref_feats = None
    if refs and models.features is not None:
        progress.log(f"eval: features of the reference renders ({models.features.name})")
        ref_feats = reference_feature_matrix(models, refs, {r["prompt_id"]: r["category"] for r in bench.prompts})
    ref_grids = ({r["prompt_id"]: bench.reference_grid(r) for r in bench.prompts}
                 if bench.has_specs and "reference_iou" in opts.metrics else None)

    all_rows, infos, grid_samples = [], [], {}
    for name, pdir in zip(policy_names(opts.policies), opts.policies):
        samples, info = evaluate_policy(name, Path(pdir), bench, prompts_path, opts, progress)
        rows, per = compute_metrics(name, samples, categories, opts.metrics, models, refs, ref_grids,
                                    opts.kd_subsets, opts.kd_subset_size, opts.seed, ref_feats, progress)
        for r in rows:
            r.update(policy_id=info["policy_id"], bench=bench.name)
        all_rows += rows
        infos.append(info)
        per_path = out / name / "per_sample.parquet"
        with shards_io.atomic_path(per_path) as tmp:
            pq.write_table(pa.Table.from_pylist([{k: (json.dumps(v) if isinstance(v, dict) else v)
                                                  for k, v in r.items()} for r in per]), tmp)
        grid_samples[name] = {s.prompt_id: s.views for s in samples if s.sample_id.endswith(f"-0-{info['final_level']}")}

    config = {"stage": "eval", "bench": bench.name, "bench_source": bench.source, "bench_hash": bench.content_hash(),
              **{k: v for k, v in asdict(opts).items() if k not in ("out", "quiet", "overwrite")}}
    table = tables.with_metadata(metrics_table(all_rows), "metrics", config)
    tables.validate(table, "metrics", "eval output")
    shards_io.write_part(table, out / "metrics", shards_io.Shard(0, 1))
    ctx = ReportContext(
        bench=bench.name, bench_source=bench.source, bench_hash=bench.content_hash(), categories=categories,
        policies=infos, notes=bench.notes + _model_notes(models, opts, ref_source), config=config,
        grid=pick_grid(bench.prompts, grid_samples, refs, opts.grid_prompts), runs=list(opts.runs))
    files = write_report(all_rows, out, ctx)
    ok = sum(r["status"] == "ok" for r in all_rows)
    return {"stage": "eval", "out": str(out), "bench": bench.name, "prompts": len(bench.prompts),
            "policies": [i["name"] for i in infos], "rows": len(all_rows), "metrics_ok": ok,
            "metrics_skipped": len(all_rows) - ok, **{k: str(v) for k, v in files.items()}}


def _model_notes(models: Models, opts: EvalOptions, ref_source: str) -> list[str]:
    notes = []
    if models.clip is not None:
        notes.append(f"CLIP score: {models.clip.dir} (mean over views of 100*max(cos,0))")
    if models.features is not None:
        f = models.features
        what = {"clip": "CLIP image embeddings (the offline default; NOT Inception-V3/DINOv2, so KD/FD are not "
                        "comparable with the paper's numbers)",
                "hf": "the CLS token of the model's last hidden state (DINOv2 protocol)",
                "torchscript": "Inception-V3 pool features (TorchScript)"}[f.kind]
        notes.append(f"KD/FD features: {f.path} ({model_fingerprint(f.path)}): {what}")
    if ref_source:
        notes.append(f"reference renders: {ref_source}")
    notes.append(f"renders: {opts.views} views at {opts.resolution}px (supersample {opts.supersample}); "
                 f"{opts.samples_per_prompt} samples per prompt; "
                 f"seed {opts.seed}")
    return notes
