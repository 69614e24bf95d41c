"""`rl3d eval`: score policies on a benchmark (gen -> render -> metrics) and write a report."""
from __future__ import annotations

import json as jsonlib
from pathlib import Path

import click

from rl3d.cli.common import handle_errors

METRIC_HELP = "decode, clip, kd, fd, spec, geometry, diversity, reference_iou"


@click.command("eval")
@click.option("--bench", required=True, metavar="NAME|FILE",
              help="synth-reasoning, text-reasoning, or a benchmark file (.csv/.json/.jsonl/.parquet/.txt with "
                   "prompt [, prompt_id, category, reference_dir]).")
@click.option("--policy", "policies", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Policy checkpoint dir; repeat to compare (deltas are vs the first). Default: the shipped policy.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output dir: <policy>/gen, <policy>/renders (resumable), metrics/, report.md, report.html, plots/.")
@click.option("--references", type=click.Path(exists=True, file_okay=False), default=None,
              help="Reference renders for KD/FD: a renders table dir, or one image folder per prompt_id. "
                   "Spec benchmarks (synth-reasoning) render their ground truth when this is not given.")
@click.option("--metrics", "metric_list", default=None, metavar="LIST",
              help=f"Comma-separated metric groups [all: {METRIC_HELP}].")
@click.option("--samples-per-prompt", default=4, show_default=True, type=int, help="Samples per prompt (group size).")
@click.option("--limit", default=None, type=int, help="Use only the first N prompts of each category.")
@click.option("--feature-model", type=click.Path(exists=True), default=None,
              help="KD/FD features: a DINOv2 or CLIP transformers dir, or an Inception-V3 TorchScript file "
                   "[default: the CLIP scorer's vision tower].")
@click.option("--clip-model", type=click.Path(exists=True, file_okay=False), default=None,
              help="CLIPModel dir for the CLIP score [default: the shipped scorer in rl3d/assets/scorer].")
@click.option("--mode", type=click.Choice(["auto", "hi-grpo", "flat"]), default="auto", show_default=True,
              help="Generation mode; auto reads the policy's rl3d_policy.json (default hi-grpo). The final level "
                   "(fine / single) is scored.")
@click.option("--views", default=6, show_default=True, type=int, help="Rendered views per sample.")
@click.option("--resolution", default=256, show_default=True, type=int, help="Render size in pixels.")
@click.option("--supersample", default=2, show_default=True, type=click.IntRange(1, 8),
              help="Render anti-aliasing: K x K rays per pixel (see rl3d render --supersample).")
@click.option("--workers", default=None, type=int, help="Render processes [the render stage's default].")
@click.option("--device", default=None, help="torch device for gen and metric models [cuda if available].")
@click.option("--kd-subsets", default=100, show_default=True, type=int, help="KD subsets when a set exceeds --kd-subset-size.")
@click.option("--kd-subset-size", default=1000, show_default=True, type=int, help="KD subset size.")
@click.option("--grid-prompts", default=6, show_default=True, type=int, help="Prompts in the report's render grid.")
@click.option("--run", "runs", multiple=True, type=click.Path(exists=True),
              help="rl-step run metrics (Parquet with step, name, value, or a dir of them) to plot; repeatable.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (gen sampling, KD subsets).")
@click.option("--overwrite", is_flag=True, help="Redo gen and render even where complete.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "json_out", is_flag=True, help="Print a machine-readable summary on stdout.")
@handle_errors
def command(bench, policies, out, references, metric_list, samples_per_prompt, limit, feature_model, clip_model,
            mode, views, resolution, supersample, workers, device, kd_subsets, kd_subset_size, grid_prompts, runs, seed, overwrite, quiet,
            json_out):
    """Evaluate policies on a reasoning benchmark and write Parquet metrics + a Markdown/HTML report.

    Every metric is computed per category and overall: CLIP score, KD (x100, unbiased polynomial-kernel
    MMD^2) and FD against reference renders, spec accuracy per attribute, geometry rates, diversity,
    decode failures. A metric whose inputs are missing is listed as skipped with the reason.
    """
    from rl3d.formats.errors import InputError
    from rl3d.stages.eval import METRIC_GROUPS, EvalOptions, run_eval

    if not policies:
        from rl3d.stages.policy import default_policy_dir

        policies = (str(default_policy_dir()),)
    groups = METRIC_GROUPS if not metric_list else tuple(m.strip() for m in metric_list.split(",") if m.strip())
    if not groups:
        raise InputError("--metrics: empty list")
    opts = EvalOptions(bench=bench, policies=list(policies), out=out, references=references, metrics=groups,
                       samples_per_prompt=samples_per_prompt, limit=limit, feature_model=feature_model,
                       clip_model=clip_model, seed=seed, mode=mode, views=views, resolution=resolution, supersample=supersample, workers=workers, device=device,
                       kd_subsets=kd_subsets, kd_subset_size=kd_subset_size, grid_prompts=grid_prompts,
                       runs=list(runs), overwrite=overwrite, quiet=quiet)
    summary = run_eval(opts)
    if json_out:
        click.echo(jsonlib.dumps(summary, sort_keys=True, default=str))
    elif not quiet:
        click.echo(f"eval: {summary['prompts']} prompts x {len(summary['policies'])} policies, "
                   f"{summary['metrics_ok']} metrics ({summary['metrics_skipped']} skipped); "
                   f"report: {summary['report_html']}", err=True)
