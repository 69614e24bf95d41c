"""`rl3d train-scorer`: train the default alignment scorer (a small CLIP) on synth renders."""
from __future__ import annotations

import json
from pathlib import Path

import click

from rl3d.cli.common import handle_errors


@click.command("train-scorer")
@click.option("--objects", required=True, type=click.Path(path_type=Path),
              help="Objects table from `rl3d synth` (prompt, split): file, dir or glob.")
@click.option("--renders", required=True, type=click.Path(path_type=Path),
              help="Renders of those objects from `rl3d render`.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the CLIPModel, tokenizer, image processor and scorer.json.")
@click.option("--steps", default=3000, show_default=True, type=int, help="Optimiser steps.")
@click.option("--batch-size", default=256, show_default=True, type=int, help="Objects per step (one view each).")
@click.option("--lr", default=5e-4, show_default=True, type=float, help="Peak learning rate (cosine decay).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:i]")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quiet", is_flag=True, help="No progress lines.")
@click.option("--json", "json_out", is_flag=True, help="Print the training summary as JSON on stdout.")
@handle_errors
def command(objects, renders, out, steps, batch_size, lr, device, seed, quiet, json_out):
    """Train the alignment scorer contrastively on (render, caption) pairs; report eval top-1 of 16.

    Ship it by copying --out to assets/scorer/ (the `clip` reward backend's default model)."""
    from rl3d.stages import train_scorer

    log = (lambda m: None) if quiet else (lambda m: click.echo(f"[rl3d] {m}", err=True))
    info = train_scorer.train(objects, renders, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                              device=device, log=log)
    if json_out:
        click.echo(json.dumps(info, sort_keys=True))
    elif not quiet:
        click.echo(f"train-scorer eval_top1_of_16={info['eval_top1_of_16']} out={out}", err=True)
