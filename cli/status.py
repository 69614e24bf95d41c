"""`rl3d status`: done and missing shards of a stage or a whole run."""
from __future__ import annotations

import json as jsonlib
import sys

import click

from rl3d.cli.common import handle_errors
from rl3d.stages.status import as_dict, run_status, status_line


@click.command("status")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "json_out", is_flag=True, help="Print one JSON object per stage output on stdout.")
@handle_errors
def command(path, json_out):
    """Which shards of each stage output under PATH are done or missing, with the Slurm array
    expression (for sbatch's array option) that resubmits exactly the missing ones. PATH is a stage output dir or a run dir
    (searched four levels down; rl-step checkpoints count as one shard).

    Exit code 0 when everything found is complete, 3 when something is missing, 2 on bad input.

    \b
    Examples:
      rl3d status runs/demo
      rl3d status runs/demo/step-000003/renders --json
    """
    found = run_status(path)
    for s in found:
        if json_out:
            click.echo(jsonlib.dumps(as_dict(s), sort_keys=True))
        else:
            click.echo(status_line(s))
    sys.exit(0 if all(s.complete for s in found) else 3)
