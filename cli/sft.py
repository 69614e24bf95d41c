"""`rl3d sft`: supervised warm start of a policy on synth objects."""
from __future__ import annotations

import json as jsonlib
from pathlib import Path

import click

from rl3d.cli.common import handle_errors


@click.command("sft")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Objects table from `rl3d synth` (file, dir of parts or glob), or any table with "
                   "prompt, plan, detail and voxels or mesh_tokens.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run dir: checkpoints/, metrics.jsonl/.parquet, final/ (the trained policy).")
@click.option("--init", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Fine-tune this policy / causal-LM dir (its tokenizer; mesh tokens added if missing).")
@click.option("--config", "config_name", default=None, metavar="NAME",
              help="Train a Qwen2 model from scratch: tiny, default (the shipped policy), small, base. "
                   "The tokenizer is built from the training data.")
@click.option("--mode", type=click.Choice(["hi-grpo", "flat", "both"]), default="hi-grpo", show_default=True,
              help="Sequences to train: coarse+fine levels (hi-grpo), single level (flat), or all three.")
@click.option("--codec", type=click.Path(path_type=Path), default=None,
              help="Codec dir (default: --init's codec, else the shipped one).")
@click.option("--text-vocab", default=1024, show_default=True, type=int, help="BPE text vocabulary (with --config).")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Sequences per micro-batch per device.")
@click.option("--grad-accum", default=1, show_default=True, type=int, help="Micro-batches per optimizer step.")
@click.option("--steps", default=None, type=int, help="Optimizer steps (default: --epochs 1).")
@click.option("--epochs", default=None, type=float, help="Passes over the training sequences.")
@click.option("--lr", default=3e-4, show_default=True, type=float, help="Peak learning rate (AdamW, cosine).")
@click.option("--warmup", default=0.05, show_default=True, type=float, help="Warm-up fraction of the steps.")
@click.option("--weight-decay", default=0.01, show_default=True, type=float)
@click.option("--max-grad-norm", default=1.0, show_default=True, type=float, help="Gradient clipping.")
@click.option("--eval-every", default=None, type=int, help="Steps between eval-loss runs (default: steps/10).")
@click.option("--eval-rows", default=512, show_default=True, type=int, help="Held-out sequences per eval.")
@click.option("--eval-fraction", default=0.02, show_default=True, type=float,
              help="Held-out object fraction when the table has no eval split.")
@click.option("--save-every", default=None, type=int, help="Steps between checkpoints (default: steps/5).")
@click.option("--keep-checkpoints", default=2, show_default=True, type=int)
@click.option("--log-every", default=10, show_default=True, type=int, help="Steps between metrics rows.")
@click.option("--save-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Weight dtype of final/ (loaders cast to their compute dtype).")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (init, data order, held-out).")
@click.option("--overwrite", is_flag=True, help="Start over, deleting this run's checkpoints and final/.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "json_out", is_flag=True, help="Print a machine-readable summary on stdout.")
@handle_errors
def command(config_name, json_out, **kw):
    """Supervised warm start on synth data, in the sequence format gen produces.

    Resumes from OUT/checkpoints/ automatically. Several GPUs:
    `accelerate launch -m rl3d.cli.main sft ...`.
    """
    from rl3d.stages.sft import SFTOptions, run_sft

    opts = SFTOptions(config=config_name, **kw)
    summary = run_sft(opts)
    if json_out:
        click.echo(jsonlib.dumps(summary, sort_keys=True, default=str))
    elif not opts.quiet:
        keys = ("stage", "steps", "train_loss", "eval_loss", "seconds", "skipped", "final")
        click.echo(" ".join(f"{k}={summary[k]}" for k in keys if k in summary), err=True)
