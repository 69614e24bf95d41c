"""eval's measures: a policy's final-level samples (decoded grids, rendered views, specs) -> metric
rows per category and overall, and per-sample records. A metric whose inputs are missing is a row
with status "skipped" and the reason, never a zero. A new metric: computed here, one line in
stages/scoring/registry.py."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from transformers.utils import logging as hf_logging

from rl3d.formats.voxels import voxel_iou
from rl3d.stages.contract import Progress
from rl3d.stages.evaluation.options import FEATURE_GROUPS, EvalOptions
from rl3d.stages.evaluation.rows import ALL, metric_row, skipped
from rl3d.stages.rewards import geometry
from rl3d.stages.rewards.spec import check_spec
from rl3d.stages.scoring.clip_scorer import ClipScorer, default_scorer_dir
from rl3d.stages.scoring.metrics import (KD_SCALE, FeatureModel, frechet_distance, kernel_distance, mean_rbf_kernel,
                                         mean_std, model_fingerprint, pairwise_iou_mean, rate)

GEOMETRY_RATES = ("single_component_rate", "grounded_rate", "stable_rate", "watertight_rate")


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


def load_models(opts: EvalOptions, groups, quiet: bool = False) -> Models:
    """The CLIP scorer and the KD/FD feature model the groups need (a reason where one is missing)."""
    models = Models(batch_size=opts.batch_size)
    if quiet:  # --quiet means no progress output, transformers' weight-loading bars included
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


def model_notes(models: Models, opts: EvalOptions, ref_source: str) -> list[str]:
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
