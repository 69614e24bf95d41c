"""`rl3d rl-step`: one Hi-GRPO / GRPO policy update."""
from __future__ import annotations

import json
from pathlib import Path

import click

from rl3d.cli.common import handle_errors


@click.command("rl-step")
@click.option("--policy", "policy_dir", required=True, type=click.Path(path_type=Path),
              help="Policy checkpoint dir to update (an sft final dir or a previous rl-step output).")
@click.option("--samples", required=True, help="Samples table from `rl3d gen` (file, dir or glob).")
@click.option("--rewards", required=True, help="Rewards table from `rl3d reward`.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output checkpoint dir (policy version v+1).")
@click.option("--algo", type=click.Choice(["hi-grpo", "grpo"]), default="hi-grpo", show_default=True)
@click.option("--lambda", "lam", type=float, default=1.0, show_default=True,
              help="Back-flow: level-2 reward added to level 1 (R_high + lambda * R_low).")
@click.option("--beta", type=float, default=0.01, show_default=True, help="k3 KL weight; 0 loads no reference.")
@click.option("--kl-max", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Cap on the per-token k3 KL (10 = verl's low_var_kl); 0 leaves it uncapped, as HI-GRPO.md.")
@click.option("--ref", "ref_dir", default=None, help="Reference policy (default: the run's initial policy).")
@click.option("--clip-low", type=float, default=0.2, show_default=True)
@click.option("--clip-high", type=float, default=0.28, show_default=True)
@click.option("--loss-agg", type=click.Choice(["token", "sequence", "dr-grpo"]), default="token", show_default=True)
@click.option("--ratio", type=click.Choice(["token", "sequence"]), default="token", show_default=True,
              help="sequence = GSPO-style geometric-mean ratio.")
@click.option("--adv-std", type=click.Choice(["group", "none"]), default="group", show_default=True)
@click.option("--std-eps", type=float, default=1e-4, show_default=True)
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--minibatch", type=int, default=0, show_default=True,
              help="Sequences per optimizer step (0 = the whole batch, one update per epoch).")
@click.option("--micro-batch", type=int, default=8, show_default=True, help="Sequences per forward pass.")
@click.option("--lr", type=float, default=1e-6, show_default=True)
@click.option("--warmup-updates", type=click.IntRange(min=0), default=0, show_default=True,
              help="Linear LR warm-up over the run's first N optimizer updates (counted across steps).")
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--dynamic-sampling", default="off", show_default=True, metavar="off|zero-std|min-std:X",
              help="Drop groups without reward spread.")
@click.option("--failed-rewards", type=click.Choice(["drop-group", "error", "penalty"]), default="drop-group",
              show_default=True, help="A sample without a reward: drop its group, stop, or (penalty) score a "
              "policy failure (decode_error: an empty mesh) --failed-penalty; other failures drop the group.")
@click.option("--failed-penalty", type=float, default=0.0, show_default=True,
              help="Total reward of a failed sample under --failed-rewards penalty (per level).")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--lora-rank", type=int, default=0, help="Train a LoRA adapter of this rank (peft), merged on save.")
@click.option("--run-metrics", default=None, help="Run-level metrics Parquet to append to "
              "(default: metrics.parquet beside --out).")
@click.option("--device", default=None)
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16"]))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--quiet", is_flag=True)
@click.option("--json", "json_out", is_flag=True)
@handle_errors
def command(policy_dir, samples, rewards, out, dynamic_sampling, run_metrics, device, dtype, ref_dir, overwrite,
            quiet, json_out, lora_rank, **kw):
    """One policy update: advantages per level and prompt group (with the Hi-GRPO back-flow), the
    clipped token-level objective with a k3 KL to a frozen reference, and a complete checkpoint."""
    from rl3d.formats.errors import InputError
    from rl3d.stages.contract import Progress
    from rl3d.stages.rl.config import RLConfig
    from rl3d.stages.rl_step import run_rl_step

    ds, min_std = dynamic_sampling, 0.0
    if ds.startswith("min-std"):
        try:
            ds, min_std = "min-std", float(ds.split(":", 1)[1])
        except (IndexError, ValueError):
            raise InputError(f"--dynamic-sampling {dynamic_sampling!r}: expected min-std:X, e.g. min-std:0.05") from None
    elif ds not in ("off", "zero-std"):
        raise InputError(f"--dynamic-sampling {dynamic_sampling!r}: expected off, zero-std or min-std:X")
    cfg = RLConfig(dynamic_sampling=ds, min_std=min_std, **kw)
    run_metrics = run_metrics or str(Path(out).parent / "metrics.parquet")
    summary = run_rl_step(policy_dir, samples, rewards, out, cfg, ref_dir=ref_dir, run_metrics=run_metrics,
                          device=device, dtype=dtype, overwrite=overwrite, lora_rank=lora_rank,
                          progress=Progress(quiet))
    if json_out:
        click.echo(json.dumps(summary, sort_keys=True, default=str))
    elif not quiet:
        click.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()), err=True)
