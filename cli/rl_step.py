"""`rl3d rl-step`: one Hi-GRPO / GRPO policy update."""
from __future__ import annotations

import time
from pathlib import Path

import click

from rl3d.cli.common import common_options, handle_errors, pop_common_options, report
from rl3d.cli.update_options import parse_dynamic_sampling, update_options

EXAMPLES = """Examples (from the repository root; assets/policy is the shipped policy):

\b
  rl3d rl-step --policy assets/policy --samples runs/demo/step-000001/gen \\
      --rewards runs/demo/step-000001/rewards --out runs/demo/step-000001/policy
  rl3d rl-step --policy runs/demo/step-000001/policy --samples runs/demo/step-000002/gen \\
      --rewards runs/demo/step-000002/rewards --out runs/demo/step-000002/policy \\
      --lr 1e-5 --kl-max 10 --failed-rewards penalty --dynamic-sampling zero-std
\b
Several GPUs (same options):
  accelerate launch -m rl3d.cli.main rl-step --policy ... --samples ... --rewards ... --out ...
"""


@click.command("rl-step", epilog=EXAMPLES, short_help="One Hi-GRPO / GRPO policy update -> a complete checkpoint.")
@click.option("--policy", "policy_dir", required=True, type=click.Path(path_type=Path),
              help="Policy checkpoint dir to update (an sft final dir or a previous rl-step output).")
@click.option("--samples", required=True, help="Samples table from `rl3d gen` (file, dir or glob).")
@click.option("--rewards", required=True, help="Rewards table from `rl3d reward` (joined on sample_id).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output checkpoint dir (policy version v+1); a complete one is skipped.")
@click.option("--algo", type=click.Choice(["hi-grpo", "grpo"]), default="hi-grpo", show_default=True,
              help="hi-grpo: coarse and fine levels, advantages per level with the back-flow of --lambda; grpo: "
                   "one level (samples of `rl3d gen --mode flat`), no back-flow.")
@click.option("--ref", "ref_dir", default=None, show_default="the run's initial policy",
              help="Reference policy dir for the KL term.")
@click.option("--tensorboard", type=click.Path(file_okay=False), default=None,
              help="Also write the step's metrics as TensorBoard scalars into this log dir (needs rl3d[tensorboard]).")
@click.option("--allow-unverified", is_flag=True,
              help="Join --rewards and --samples that carry no rl3d provenance (written or rewritten by another tool).")
@click.option("--allow-off-policy", is_flag=True,
              help="Update from samples that another policy drew (by default --samples must come from --policy).")
@update_options
@click.option("--lora-rank", type=int, default=0, show_default=True,
              help="Train a LoRA adapter of this rank (peft), merged on save; 0 trains all weights.")
@click.option("--run-metrics", default=None, show_default="metrics.parquet beside --out",
              help="Run-level metrics Parquet to append this step's row to.")
@click.option("--device", default=None, show_default="cuda if available, else cpu", help="torch device.")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16"]),
              show_default="bfloat16 autocast on CUDA, float32 on CPU",
              help="Compute dtype (weights and optimizer state stay float32; --bf16-weights keeps the trained "
                   "weights in bf16 and, with bfloat16 here, computes in bf16 on a CPU too).")
@common_options(seed_help="Random seed (minibatch order).",
                overwrite_help="Redo the update even if --out is a complete checkpoint.")
@handle_errors
def command(policy_dir, samples, rewards, out, dynamic_sampling, run_metrics, device, dtype, ref_dir, lora_rank,
            allow_off_policy, tensorboard, allow_unverified, **kw):
    """One policy update: advantages per level and prompt group (with the Hi-GRPO back-flow), the
    clipped token-level objective with a k3 KL to a frozen reference, and a complete checkpoint.

    See docs/rl.md for the loss, the options and measured runs.
    """
    started = time.time()
    # torch, transformers, accelerate: most of a step's start-up (startup_s in the metrics)
    from rl3d.stages.rl.rl_config import RLConfig
    from rl3d.stages.rl_step import RLStepJob, StepOptions

    startup_s = time.time() - started
    opts = pop_common_options(kw, out=out)
    ds, min_std = parse_dynamic_sampling(dynamic_sampling)
    cfg = RLConfig(dynamic_sampling=ds, min_std=min_std, seed=opts.seed, **kw)
    run_metrics = run_metrics or str(Path(out).parent / "metrics.parquet")
    options = StepOptions(ref_dir=ref_dir, run_metrics=run_metrics, device=device, dtype=dtype, lora_rank=lora_rank,
                          allow_off_policy=allow_off_policy, allow_unverified=allow_unverified,
                          tensorboard=tensorboard, startup_s=startup_s)
    summary = RLStepJob(policy_dir, samples, rewards, cfg, options).run(opts)
    report(summary, opts, stage="rl-step", started=started,
           line_keys=("step", "loss", "kl", "reward_mean_coarse", "reward_mean_fine", "reward_mean_single",
                      "kept_samples", "dropped_groups", "grad_norm"))
