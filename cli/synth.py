"""`rl3d synth`: procedural coloured voxel objects with captions, plans, specs, tokens and GLBs."""
from __future__ import annotations

import click

from rl3d.cli.common import handle_errors, pop_stage_options, report, stage_options


@click.command("synth")
@click.option("--n", "n", required=True, type=int, help="Number of objects (ids 0..N-1; shards take a subset).")
@click.option("--split", type=click.Choice(["train", "eval", "all"]), default="all", show_default=True,
              help="train: common objects only; eval: every category incl. rare compositions; "
                   "all: each object gets its split (rare -> eval, else ~85% train).")
@click.option("--no-meshes", is_flag=True, help="Skip GLB writing (fast, for large SFT sets).")
@stage_options
@handle_errors
def command(n, split, no_meshes, **kw):
    """Generate N shape-world objects into an objects table (deterministic by --seed)."""
    from rl3d.stages.synth import run_synth

    opts = pop_stage_options(kw)
    report(run_synth(n, opts.seed, split, opts, meshes=not no_meshes), opts)
