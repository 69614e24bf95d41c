"""`rl3d sft`: supervised warm start of a policy on synth objects."""
from __future__ import annotations

import time
from pathlib import Path

import click

from rl3d.cli.common import common_options, handle_errors, pop_common_options, report

EXAMPLES = """Examples:

\b
  rl3d synth --n 2000 --no-meshes --split train --out data/sft_objects
  rl3d sft --data data/sft_objects --config tiny --steps 200 --out runs/sft-tiny
  rl3d sft --data data/sft_objects --init runs/sft-tiny/final --epochs 2 --lr 1e-4 --out runs/sft-ft
\b
Several GPUs (same options):
  accelerate launch -m rl3d.cli.main sft --data data/sft_objects --config default --out runs/sft
"""


@click.command("sft", epilog=EXAMPLES)
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Objects table from `rl3d synth` (file, dir of parts or glob), or any table with "
                   "prompt, plan, detail and voxels or mesh_tokens.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run dir: checkpoints/, metrics.jsonl/.parquet, final/ (the trained policy).")
@click.option("--init", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Fine-tune this policy / causal-LM dir (its tokenizer; mesh tokens added if missing). "
                   "Give exactly one of --init and --config.")
@click.option("--config", "config_name", default=None, metavar="NAME",
              help="Train a Qwen2 model from scratch: tiny, default (the shipped policy), small, base. "
                   "The tokenizer is built from the training data.")
@click.option("--mode", type=click.Choice(["hi-grpo", "flat", "both"]), default="hi-grpo", show_default=True,
              help="Sequences to train: coarse+fine levels (hi-grpo), single level (flat), or all three.")
@click.option("--codec", type=click.Path(path_type=Path), default=None,
              show_default="--init's codec, else the shipped one",
              help="Codec dir (codebook.npz + codec.json from `rl3d codec build`): the mesh tokens to learn.")
@click.option("--text-vocab", default=1024, show_default=True, type=int,
              help="BPE text vocabulary size, in tokens (with --config).")
@click.option("--batch-size", default=16, show_default=True, type=int, help="Sequences per micro-batch per device.")
@click.option("--grad-accum", default=1, show_default=True, type=int, help="Micro-batches per optimizer step.")
@click.option("--steps", default=None, type=int, show_default="--epochs 1",
              help="Optimizer steps (give --steps or --epochs, not both).")
@click.option("--epochs", default=None, type=float, help="Passes over the training sequences (may be fractional).")
@click.option("--lr", default=3e-4, show_default=True, type=float, help="Peak learning rate (AdamW, cosine decay).")
@click.option("--warmup", default=0.05, show_default=True, type=float,
              help="Linear warm-up, as a fraction of the steps.")
@click.option("--weight-decay", default=0.01, show_default=True, type=float, help="AdamW weight decay.")
@click.option("--max-grad-norm", default=1.0, show_default=True, type=float, help="Gradient clipping (global L2 norm).")
@click.option("--eval-every", default=None, type=int, show_default="steps/10", help="Steps between eval-loss runs.")
@click.option("--eval-rows", default=512, show_default=True, type=int, help="Held-out sequences per eval.")
@click.option("--eval-fraction", default=0.02, show_default=True, type=float,
              help="Held-out object fraction when the table has no eval split.")
@click.option("--save-every", default=None, type=int, show_default="steps/5", help="Steps between checkpoints.")
@click.option("--keep-checkpoints", default=2, show_default=True, type=int,
              help="Checkpoints kept in OUT/checkpoints/ (older ones are deleted).")
@click.option("--log-every", default=10, show_default=True, type=int, help="Steps between metrics rows.")
@click.option("--save-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Weight dtype of final/ (loaders cast to their compute dtype).")
@common_options(seed_help="Random seed (init, data order, held-out split).",
                overwrite_help="Start over, deleting this run's checkpoints and final/ (a finished run is "
                               "skipped, an unfinished one resumed, without it).")
@handle_errors
def command(config_name, **kw):
    """Supervised warm start on synth data, in the sequence format gen produces.

    Resumes from OUT/checkpoints/ automatically; a run whose final/ exists is skipped. See
    docs/default_policy.md.
    """
    from rl3d.stages.sft import SFTJob
    from rl3d.stages.supervised.options import SFTOptions

    started = time.time()
    opts = pop_common_options(kw, out=kw.pop("out"))
    summary = SFTJob(SFTOptions(config=config_name, seed=opts.seed, **kw)).run(opts)
    report(summary, opts, stage="sft", started=started, line_keys=("steps", "train_loss", "eval_loss", "final"))
