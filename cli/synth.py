"""`rl3d synth`: procedural coloured voxel objects with captions, plans, specs, tokens and GLBs."""
from __future__ import annotations

import time

import click

from rl3d.cli.common import handle_errors, pop_stage_options, report, stage_options

EXAMPLES = """Examples:

\b
  rl3d synth --n 64 --seed 1 --split train --out runs/demo/prompts
  rl3d synth --n 20000 --no-meshes --out data/sft_objects --json
  rl3d synth --n 100000 --no-meshes --shard 0/4 --out data/big   # one of 4 shards
"""


@click.command("synth", epilog=EXAMPLES)
@click.option("--n", "n", required=True, type=int, help="Number of objects (ids 0..N-1; a shard makes its subset).")
@click.option("--split", type=click.Choice(["train", "eval", "all"]), default="all", show_default=True,
              help="train: common objects only; eval: every category incl. rare compositions; "
                   "all: each object gets its split (rare -> eval, else ~85% train).")
@click.option("--no-meshes", is_flag=True, help="Skip GLB writing (fast, for large SFT sets).")
@stage_options
@handle_errors
def command(n, split, no_meshes, **kw):
    """Generate N shape-world objects into an objects table (deterministic by --seed).

    Writes OUT/part-*.parquet (an objects table: prompt (the caption), plan, detail, spec,
    voxels, mesh tokens, split) and OUT/_meshes/<sample_id>.glb. See docs/shape_world.md.
    """
    from rl3d.stages.synth import run_synth

    started = time.time()
    opts = pop_stage_options(kw)
    report(run_synth(n, opts.seed, split, opts, meshes=not no_meshes), opts, stage="synth", started=started)
