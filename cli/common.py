"""Options and error handling shared by every stage command."""
from __future__ import annotations

import functools
import json as jsonlib
import sys
from pathlib import Path

import click

from rl3d.formats.errors import InputError
from rl3d.formats.shards import parse_shard
from rl3d.stages.contract import StageOptions


def stage_options(f):
    """--out, --shard, --overwrite, --seed, --quiet, --json: the stage contract's options."""
    opts = [
        click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Output directory (created; completed shards in it are skipped)."),
        click.option("--shard", default=None, metavar="I/N",
                     help="Process shard I of N (by prompt_id). Default: SLURM_ARRAY_TASK_ID/"
                          "SLURM_ARRAY_TASK_COUNT when set, else 0/1."),
        click.option("--overwrite", is_flag=True, help="Redo the shard even if complete."),
        click.option("--seed", default=0, show_default=True, type=int, help="Random seed."),
        click.option("--quiet", is_flag=True, help="No progress output."),
        click.option("--json", "json_out", is_flag=True, help="Print a machine-readable summary on stdout."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def pop_stage_options(kw: dict) -> StageOptions:
    return StageOptions(out=kw.pop("out"), shard=parse_shard(kw.pop("shard")), overwrite=kw.pop("overwrite"),
                        seed=kw.pop("seed"), quiet=kw.pop("quiet"), json=kw.pop("json_out"))


def report(summary: dict, opts: StageOptions) -> None:
    """Print the stage summary: JSON on stdout with --json, a short line on stderr otherwise."""
    if opts.json:
        click.echo(jsonlib.dumps(summary, sort_keys=True, default=str))
    elif not opts.quiet:
        keys = ("stage", "shard", "rows", "seconds", "skipped")
        click.echo(" ".join(f"{k}={summary[k]}" for k in keys if k in summary), err=True)


def handle_errors(f):
    """Bad input -> one line on stderr naming the file (and row), exit code 2."""

    @functools.wraps(f)
    def wrapper(*a, **kw):
        try:
            return f(*a, **kw)
        except InputError as e:
            ctx = click.get_current_context(silent=True)
            name = ctx.command_path if ctx else "rl3d"
            click.echo(f"{name}: error: {e}", err=True)
            sys.exit(2)

    return wrapper
