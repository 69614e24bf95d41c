"""`rl3d rl-step`: one Hi-GRPO / GRPO policy update."""
from __future__ import annotations

import time
from pathlib import Path

import click

from rl3d.cli.common import common_options, handle_errors, pop_common_options, report
from rl3d.formats.errors import InputError

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


def update_options(f):
    """The update's options (one RLConfig field each), shared by `rl3d rl-step` and `rl3d train`."""
    for option in reversed(UPDATE_OPTIONS):
        f = option(f)
    return f


UPDATE_OPTIONS = [
    click.option("--lambda", "lam", type=float, default=1.0, show_default=True,
                  help="Back-flow: level-2 reward added to level 1 (R_high + lambda * R_low)."),
    click.option("--beta", type=float, default=0.01, show_default=True, help="k3 KL weight; 0 loads no reference."),
    click.option("--kl-max", type=click.FloatRange(min=0), default=0.0, show_default=True,
                  help="Cap on the per-token k3 KL (10 = verl's low_var_kl); 0 leaves it uncapped, as the Hi-GRPO "
                       "loss does (docs/rl.md)."),
    click.option("--clip-low", type=float, default=0.2, show_default=True,
                  help="PPO clip below: the ratio is clipped at 1 - clip-low."),
    click.option("--clip-high", type=float, default=0.28, show_default=True,
                  help="PPO clip above: the ratio is clipped at 1 + clip-high (DAPO's clip-higher)."),
    click.option("--loss-agg", type=click.Choice(["token", "sequence", "dr-grpo"]), default="token", show_default=True,
                  help="Loss mean per level: token: over all tokens (DAPO); sequence: per sequence, then over "
                       "sequences (GRPO); dr-grpo: over sequences x the longest completion."),
    click.option("--ratio", type=click.Choice(["token", "sequence"]), default="token", show_default=True,
                  help="Importance ratio per token, or per sequence (GSPO-style geometric mean)."),
    click.option("--adv-std", type=click.Choice(["group", "none"]), default="group", show_default=True,
                  help="Divide advantages by the group's reward std (group) or only centre them (none, Dr. GRPO)."),
    click.option("--std-eps", type=float, default=1e-4, show_default=True,
                  help="Added to the group std before dividing (--adv-std group)."),
    click.option("--epochs", type=int, default=1, show_default=True, help="Passes over the samples in this step."),
    click.option("--minibatch", type=int, default=0, show_default=True,
                  help="Sequences per optimizer step (0 = the whole batch, one update per epoch)."),
    click.option("--micro-batch", type=int, default=8, show_default=True,
                  help="Sequences per forward pass (gradient accumulation; the update is the same)."),
    click.option("--lr", type=float, default=1e-6, show_default=True, help="Learning rate (AdamW)."),
    click.option("--warmup-updates", type=click.IntRange(min=0), default=0, show_default=True,
                  help="Linear LR warm-up over the run's first N optimizer updates (counted across steps)."),
    click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping (global L2 norm)."),
    click.option("--dynamic-sampling", default="off", show_default=True, metavar="off|zero-std|min-std:X",
                  help="Drop groups without reward spread: zero-std drops groups whose rewards are all equal, "
                       "min-std:X groups whose reward std is below X."),
    click.option("--failed-rewards", type=click.Choice(["drop-group", "error", "penalty"]), default="drop-group",
                  show_default=True, help="A sample without a reward: drop its group, stop, or (penalty) score a "
                  "policy failure (decode_error: an empty mesh) --failed-penalty; other failures drop the group."),
    click.option("--failed-penalty", type=float, default=0.0, show_default=True,
                  help="Total reward of a failed sample under --failed-rewards penalty (per level)."),
    click.option("--train-levels", type=click.Choice(["all", "coarse", "fine"]), default="all", show_default=True,
                  help="hi-grpo: train both levels' tokens, or one level's only (an ablation); the other level's "
                       "rewards still reach the advantages through the back-flow."),
    click.option("--gradient-checkpointing", is_flag=True,
                  help="Recompute activations in the backward pass (less memory)."),
    click.option("--old-logprobs", type=click.Choice(["stored", "recompute"]), default="stored", show_default=True,
                  help="pi_old of the ratio: the log-probs gen stored, or recompute them with a no-grad pass of the "
                       "policy before the update (verl's default; one more forward). docs/rl.md: the mismatch metrics."),
    click.option("--length-buckets", is_flag=True,
                  help="Cut micro-batches from each minibatch in length order (less padding; the same gradient up to "
                       "float summation order)."),
    click.option("--fused-adamw/--no-fused-adamw", default=True, show_default=True,
                  help="torch's fused AdamW kernel when every trained weight is on CUDA (no effect on CPU)."),
    click.option("--tis-cap", type=float, default=0.0, show_default=True,
                  help="Truncated importance sampling: weight each token by min(pi_old / pi_behaviour, C) (needs "
                       "--old-logprobs recompute; `rl3d train --overlap 1` sets C = 2). 0 = off."),
]


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
              help="Compute dtype (weights and optimizer state stay float32).")
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
    from rl3d.stages.contract import Progress
    from rl3d.stages.rl.config import RLConfig
    from rl3d.stages.rl_step import run_rl_step

    startup_s = time.time() - started
    opts = pop_common_options(kw, out=out)
    ds, min_std = parse_dynamic_sampling(dynamic_sampling)
    cfg = RLConfig(dynamic_sampling=ds, min_std=min_std, seed=opts.seed, **kw)
    run_metrics = run_metrics or str(Path(out).parent / "metrics.parquet")
    summary = run_rl_step(policy_dir, samples, rewards, out, cfg, ref_dir=ref_dir, run_metrics=run_metrics,
                          device=device, dtype=dtype, overwrite=opts.overwrite, lora_rank=lora_rank,
                          allow_off_policy=allow_off_policy, tensorboard=tensorboard, allow_unverified=allow_unverified,
                          progress=Progress(opts.quiet), startup_s=startup_s)
    report(summary, opts, stage="rl-step", started=started,
           line_keys=("step", "loss", "kl", "reward_mean_coarse", "reward_mean_fine", "reward_mean_single",
                      "kept_samples", "dropped_groups", "grad_norm"))


def parse_dynamic_sampling(value: str) -> tuple[str, float]:
    """--dynamic-sampling off | zero-std | min-std:X -> (mode, X)."""
    if value.startswith("min-std"):
        try:
            return "min-std", float(value.split(":", 1)[1])
        except (IndexError, ValueError):
            raise InputError(f"--dynamic-sampling {value!r}: expected min-std:X, e.g. min-std:0.05") from None
    if value not in ("off", "zero-std"):
        raise InputError(f"--dynamic-sampling {value!r}: expected off, zero-std or min-std:X")
    return value, 0.0
