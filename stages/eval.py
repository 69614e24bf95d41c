"""`rl3d eval`: score policies on a benchmark and write a report people read.

For each policy: gen (its final level: "fine" for Hi-GRPO policies, "single" for flat ones) into
OUT/<policy>/gen, render of the final-level meshes into OUT/<policy>/renders (both as the stage
Jobs, so the stage contract's resumability applies: a rerun skips finished work), then the metrics
of stages/evaluation/measures.py per category and overall. Reference renders (for KD/FD) come from
--references, the benchmark file's reference_dir column, or, for benchmarks with specs
(synth-reasoning), from rendering the ground-truth grids into OUT/references once.

Outputs: OUT/metrics/part-*.parquet (a `metrics` table: name, value + policy, category, metric,
n, std, status, message, higher_is_better, ...), OUT/<policy>/per_sample.parquet, and the report
(OUT/report.md, OUT/report.html, OUT/plots/*.png) from stages/scoring/report.py. The metrics and the
report are recomputed on every run (gen and render are what skip).

A metric that cannot be computed is a row with status "skipped" and the reason, never a zero.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rl3d.formats import shards as shards_io
from rl3d.formats import tables
from rl3d.stages.contract import Job, Progress, StageOptions
from rl3d.stages.eval_sets import load_benchmark
from rl3d.stages.evaluation.inputs import (final_level_samples, given_references, policy_names, reference_objects,
                                           resolve_mode, views_by_sample, write_prompts)
from rl3d.stages.evaluation.measures import (Sample, compute_metrics, load_models, model_notes,
                                             reference_feature_matrix)
from rl3d.stages.evaluation.options import FEATURE_GROUPS, EvalOptions
from rl3d.stages.evaluation.rows import metrics_table
from rl3d.stages.gen import SAMPLED_MODES, GenJob, GenOptions
from rl3d.stages.policy.checkpoint import read_policy_meta, sft_step_of
from rl3d.stages.render import RenderJob
from rl3d.stages.scoring.report import ReportContext, pick_grid, write_report


class EvalJob(Job):
    """Policies scored on a benchmark: gen and render per policy (stage Jobs that skip finished work),
    the metrics table and the report, recomputed on every run."""

    stage, kind = "eval", "metrics"

    def __init__(self, options: EvalOptions):
        options.check()
        self.options = options
        self.bench = load_benchmark(options.bench, options.limit)  # a bad benchmark fails before any output

    def config(self) -> dict:
        b = self.bench
        return {"stage": "eval", "bench": b.name, "bench_source": b.source, "bench_hash": b.content_hash(),
                **asdict(self.options)}

    def done(self, out, shard=None) -> bool:
        """Whether `out` holds this eval's metrics table and report (a run recomputes them anyway)."""
        out = Path(out)
        return (out / "report.html").is_file() and tables.table_config(out / "metrics") == self.config()

    def run(self, opts: StageOptions) -> dict:
        o, bench, out = self.options, self.bench, Path(opts.out)
        progress = Progress(opts.quiet)
        out.mkdir(parents=True, exist_ok=True)
        prompts_path = write_prompts(bench, out)
        models = load_models(o, o.metrics, quiet=opts.quiet)
        refs, ref_source = ({}, "") if not FEATURE_GROUPS & set(o.metrics) else self.reference_renders(opts, progress)
        ref_feats = None
        if refs and models.features is not None:
            progress.log(f"eval: features of the reference renders ({models.features.name})")
            ref_feats = reference_feature_matrix(models, refs, {r["prompt_id"]: r["category"] for r in bench.prompts})
        ref_grids = ({r["prompt_id"]: bench.reference_grid(r) for r in bench.prompts}
                     if bench.has_specs and "reference_iou" in o.metrics else None)

        all_rows, infos, grid_samples = [], [], {}
        for name, pdir in zip(policy_names(o.policies), o.policies):
            samples, info = self.evaluate_policy(name, Path(pdir), prompts_path, opts, progress)
            rows, per = compute_metrics(name, samples, bench.categories, o.metrics, models, refs, ref_grids,
                                        o.kd_subsets, o.kd_subset_size, o.seed, ref_feats, progress)
            for r in rows:
                r.update(policy_id=info["policy_id"], bench=bench.name)
            all_rows += rows
            infos.append(info)
            with shards_io.atomic_path(out / name / "per_sample.parquet") as tmp:
                pq.write_table(pa.Table.from_pylist([{k: (json.dumps(v) if isinstance(v, dict) else v)
                                                      for k, v in r.items()} for r in per]), tmp)
            grid_samples[name] = {s.prompt_id: s.views for s in samples
                                  if s.sample_id.endswith(f"-0-{info['final_level']}")}

        config = self.config()
        table = tables.with_metadata(metrics_table(all_rows), "metrics", config)
        tables.validate(table, "metrics", "eval output")
        shards_io.write_part(table, out / "metrics", shards_io.Shard(0, 1))
        ctx = ReportContext(
            bench=bench.name, bench_source=bench.source, bench_hash=bench.content_hash(), categories=bench.categories,
            policies=infos, notes=bench.notes + model_notes(models, o, ref_source), config=config,
            grid=pick_grid(bench.prompts, grid_samples, refs, o.grid_prompts), runs=list(o.runs))
        files = write_report(all_rows, out, ctx)
        ok = sum(r["status"] == "ok" for r in all_rows)
        return {"stage": "eval", "out": str(out), "bench": bench.name, "prompts": len(bench.prompts),
                "policies": [i["name"] for i in infos], "rows": len(all_rows), "metrics_ok": ok,
                "metrics_skipped": len(all_rows) - ok, **{k: str(v) for k, v in files.items()}}

    def render(self, samples_path: Path, out: Path, opts: StageOptions) -> None:
        o = self.options
        RenderJob(str(samples_path), views=o.views, resolution=o.resolution, sheet=False, workers=o.workers,
                  supersample=o.supersample).run(self.sub_options(opts, out))

    def reference_renders(self, opts: StageOptions, progress: Progress) -> tuple[dict[str, list[str]], str]:
        """prompt_id -> reference view paths, and where they came from ("" when there are none)."""
        given = given_references(self.bench, self.options.references)
        if given is not None:
            return given
        if not self.bench.has_specs:
            return {}, ""
        ref = Path(opts.out) / "references"
        self.render(reference_objects(self.bench, ref, progress), ref / "renders", opts)
        return views_by_sample(ref / "renders"), "renders of the ground-truth grids (OUT/references)"

    def evaluate_policy(self, name: str, policy_dir: Path, prompts_path: Path, opts: StageOptions,
                        progress: Progress) -> tuple[list[Sample], dict]:
        """gen + render for one policy (resumable stage dirs) -> its final-level samples and info."""
        o = self.options
        mode = resolve_mode(policy_dir, o.mode)
        final = SAMPLED_MODES[mode][-1]
        pdir = Path(opts.out) / name
        progress.log(f"eval {name}: gen ({mode}, final level {final!r}) into {pdir / 'gen'}")
        # sampling=None: as the policy's rl3d_policy.json says (e.g. a mesh-only policy's reasoning budget 0),
        # else gen's defaults
        gen = GenJob(prompts_path, GenOptions(mode=mode, group_size=o.samples_per_prompt, sampling=None,
                                              device=o.device), o.seed, policy_dir)
        gsum = gen.run(self.sub_options(opts, pdir / "gen"))
        samples = tables.read_table(pdir / "gen", "samples")
        rows = [r for r in samples.to_pylist() if r["level"] == final]
        final_path = pdir / "final_samples.parquet"
        keep = ["sample_id", "prompt_id", "sample_index", "level", "prompt", "mesh_path", "status", "message"]
        with shards_io.atomic_path(final_path) as tmp:
            pq.write_table(pa.Table.from_pylist([{k: r[k] for k in keep} for r in rows]), tmp)
        progress.log(f"eval {name}: render {len(rows)} {final} samples into {pdir / 'renders'}")
        self.render(final_path, pdir / "renders", opts)
        out = final_level_samples(rows, self.bench, policy_dir, views_by_sample(pdir / "renders"))
        meta = read_policy_meta(policy_dir)
        policy_id = rows[0]["policy_id"] if rows else tables.table_policy(pdir / "gen")
        info = {"name": name, "dir": str(Path(policy_dir).resolve()), "policy_id": policy_id, "mode": mode,
                "final_level": final, "sft_step": sft_step_of(meta),
                "rl_step": int(meta.get("rl_step", 0)), "base": meta.get("base"),
                "gen_config": tables.table_config(pdir / "gen"), "gen_skipped": bool(gsum.get("skipped"))}
        return out, info

    def sub_options(self, opts: StageOptions, out: Path) -> StageOptions:
        """The options of a gen or render stage inside the eval's output (seeded by the eval's --seed)."""
        return StageOptions(out=out, seed=self.options.seed, overwrite=opts.overwrite, quiet=opts.quiet)
