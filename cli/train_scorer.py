"""`rl3d train-scorer`: train the default alignment scorer (a small CLIP) on synth renders."""
from __future__ import annotations

import time
from pathlib import Path

import click

from rl3d.cli.common import common_options, handle_errors, pop_common_options, report

EXAMPLES = """Examples:

\b
  rl3d synth --n 400 --seed 0 --out runs/scorer/objects
  rl3d render --samples runs/scorer/objects --views 4 --resolution 128 --no-sheet --out runs/scorer/renders
  rl3d train-scorer --objects runs/scorer/objects --renders runs/scorer/renders --steps 300 --out runs/scorer/model
"""


@click.command("train-scorer", epilog=EXAMPLES, short_help="Train the default alignment scorer (a small CLIP).")
@click.option("--objects", required=True, type=click.Path(path_type=Path),
              help="Objects table from `rl3d synth` (prompt, split): file, dir or glob.")
@click.option("--renders", required=True, type=click.Path(path_type=Path),
              help="Renders of those objects from `rl3d render`.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the CLIPModel, tokenizer, image processor and scorer.json (written last; "
                   "a directory that has it is skipped).")
@click.option("--steps", default=3000, show_default=True, type=int, help="Optimiser steps.")
@click.option("--batch-size", default=256, show_default=True, type=int, help="Objects per step (one view each).")
@click.option("--lr", default=5e-4, show_default=True, type=float, help="Peak learning rate (AdamW, cosine decay).")
@click.option("--device", default="auto", show_default=True,
              help="torch device: auto (cuda if available, else cpu), cpu or cuda[:i].")
@common_options(seed_help="Random seed (init, batches, caption phrasings, eval draws).",
                overwrite_help="Retrain even if --out already holds a trained scorer.")
@handle_errors
def command(objects, renders, out, steps, batch_size, lr, device, **kw):
    """Train the alignment scorer contrastively on (render, caption) pairs; report eval top-1 of 16.

    Ship it by copying --out to assets/scorer/ (the `clip` reward backend's default model); see
    docs/rewards.md.
    """
    from rl3d.stages.train_scorer import ScorerOptions, TrainScorerJob

    started = time.time()
    opts = pop_common_options(kw, out=out)
    job = TrainScorerJob(objects, renders, ScorerOptions(steps, batch_size, lr, device, opts.seed))
    report(job.run(opts), opts, stage="train-scorer", started=started,
           line_keys=("eval_top1_of_16", "train_top1_of_16", "final_loss"))
