"""`rl3d eval`: score policies on a benchmark (gen -> render -> metrics) and write a report."""
from __future__ import annotations

import time
from pathlib import Path

import click

from rl3d.cli.common import common_options, handle_errors, pop_common_options, report
from rl3d.formats.errors import InputError

METRIC_HELP = "decode, clip, kd, fd, spec, geometry, diversity, reference_iou"
# also accepted: kd_paper (the paper's eval-script KD, a mean RBF similarity; not in the default list)

EXAMPLES = """Examples:

\b
  rl3d eval --bench synth-reasoning --out runs/eval-default
  rl3d eval --bench synth-reasoning --policy assets/policy --policy runs/demo/step-000001/policy \\
      --limit 4 --samples-per-prompt 2 --views 2 --resolution 64 --out runs/eval-step1
  rl3d eval --bench text-reasoning --metrics clip,geometry,diversity --out runs/eval-text
"""


@click.command("eval", epilog=EXAMPLES, short_help="Score policies on a benchmark: Parquet metrics + a report.")
@click.option("--bench", required=True, metavar="NAME|FILE",
              help="synth-reasoning, text-reasoning, or a benchmark file (.csv/.json/.jsonl/.parquet/.txt with "
                   "prompt [, prompt_id, category, reference_dir]).")
@click.option("--policy", "policies", multiple=True, type=click.Path(exists=True, file_okay=False),
              show_default="the shipped policy",
              help="Policy checkpoint dir; repeat to compare (deltas are vs the first).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output dir: <policy>/gen, <policy>/renders (resumable), metrics/, report.md, report.html, plots/.")
@click.option("--references", type=click.Path(exists=True, file_okay=False), default=None,
              show_default="the benchmark's reference_dir column, else its specs rendered (synth-reasoning)",
              help="Reference renders for KD/FD: a renders table dir, or one image folder per prompt_id.")
@click.option("--metrics", "metric_list", default=None, metavar="LIST", show_default=f"all: {METRIC_HELP}",
              help="Comma-separated metric groups; add kd_paper for the paper's eval-script KD (mean RBF "
                   "similarity of reference and generated features, beside rl3d's KD; docs/eval.md).")
@click.option("--samples-per-prompt", default=4, show_default=True, type=int, help="Samples per prompt (group size).")
@click.option("--limit", default=None, type=int, show_default="all prompts",
              help="Use only the first N prompts of each category.")
@click.option("--feature-model", type=click.Path(exists=True), default=None,
              show_default="the CLIP scorer's vision tower",
              help="KD/FD features: a DINOv2 or CLIP transformers dir, or an Inception-V3 TorchScript file.")
@click.option("--clip-model", type=click.Path(exists=True, file_okay=False), default=None,
              show_default="the shipped scorer in rl3d/assets/scorer", help="CLIPModel dir for the CLIP score.")
@click.option("--mode", type=click.Choice(["auto", "hi-grpo", "flat"]), default="auto", show_default=True,
              help="Generation mode; auto reads the policy's rl3d_policy.json (hi-grpo when it says nothing). "
                   "The final level (fine / single) is scored.")
@click.option("--views", default=6, show_default=True, type=int, help="Rendered views per sample.")
@click.option("--resolution", default=256, show_default=True, type=int, help="Render size in pixels.")
@click.option("--supersample", default=2, show_default=True, type=click.IntRange(1, 8),
              help="Render anti-aliasing: K x K rays per pixel (see rl3d render --supersample).")
@click.option("--workers", default=None, type=int, show_default="the render stage's default",
              help="Render processes.")
@click.option("--device", default=None, show_default="cuda if available, else cpu",
              help="torch device for gen and metric models.")
@click.option("--kd-subsets", default=100, show_default=True, type=int,
              help="KD subsets when a set exceeds --kd-subset-size.")
@click.option("--kd-subset-size", default=1000, show_default=True, type=int, help="KD subset size, in images.")
@click.option("--grid-prompts", default=6, show_default=True, type=int, help="Prompts in the report's render grid.")
@click.option("--run", "runs", multiple=True, type=click.Path(exists=True),
              help="rl-step run metrics (Parquet with step, name, value, or a dir of them) to plot; repeatable.")
@common_options(seed_help="Random seed (gen sampling, KD subsets).",
                overwrite_help="Redo gen and render even where complete (metrics and the report are always "
                               "recomputed).")
@handle_errors
def command(bench, policies, out, references, metric_list, samples_per_prompt, limit, feature_model, clip_model,
            mode, views, resolution, supersample, workers, device, kd_subsets, kd_subset_size, grid_prompts, runs, **kw):
    """Evaluate policies on a reasoning benchmark and write Parquet metrics + a Markdown/HTML report.

    Every metric is computed per category and overall: CLIP score, KD (x100, unbiased polynomial-kernel
    MMD^2) and FD against reference renders, spec accuracy per attribute, geometry rates, diversity,
    decode failures. A metric whose inputs are missing is listed as skipped with the reason.
    See docs/eval.md.
    """
    from rl3d.stages.eval import EvalJob
    from rl3d.stages.evaluation.options import METRIC_GROUPS, EvalOptions
    from rl3d.stages.policy import default_policy_dir

    started = time.time()
    opts = pop_common_options(kw, out=out)
    policies = policies or (str(default_policy_dir()),)
    groups = METRIC_GROUPS if not metric_list else tuple(m.strip() for m in metric_list.split(",") if m.strip())
    if not groups:
        raise InputError("--metrics: empty list")
    eval_opts = EvalOptions(bench=bench, policies=list(policies), references=references, metrics=groups,
                            samples_per_prompt=samples_per_prompt, limit=limit, feature_model=feature_model,
                            clip_model=clip_model, seed=opts.seed, mode=mode, views=views, resolution=resolution,
                            supersample=supersample,
                            workers=workers, device=device, kd_subsets=kd_subsets, kd_subset_size=kd_subset_size,
                            grid_prompts=grid_prompts, runs=list(runs))
    report(EvalJob(eval_opts).run(opts), opts, stage="eval", started=started,
           line_keys=("bench", "prompts", "policies", "metrics_ok", "metrics_skipped", "report_html"))
