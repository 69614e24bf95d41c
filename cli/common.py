"""Options, summary and error handling shared by every command.

Every command takes --seed, --overwrite, --quiet and --json (`common_options`); the sharded table
stages (synth, gen, render, reward) add --out and --shard (`stage_options`). Every command ends with
`report`: with --json its summary as one JSON object on stdout, otherwise one line on stderr. A
summary always has stage, out, skipped and seconds, then the command's own fields.
"""
from __future__ import annotations

import errno
import functools
import json as jsonlib
import sys
import time
from pathlib import Path

import click

from rl3d.formats.errors import InputError, RowsFailed
from rl3d.formats.shards import parse_shard
from rl3d.stages.contract import StageOptions

def common_options(seed_help: str = "Random seed.", overwrite_help: str | None = "Redo the work even if complete."):
    """--seed, --overwrite, --quiet, --json. Each command words --seed and --overwrite for what
    they decide there; overwrite_help=None leaves --overwrite out (a command that writes nothing)."""
    opts = [click.option("--seed", default=0, show_default=True, type=int, help=seed_help)]
    if overwrite_help is not None:
        opts.append(click.option("--overwrite", is_flag=True, help=overwrite_help))
    opts += [
        click.option("--quiet", is_flag=True, help="No progress output and no summary line (errors still print)."),
        click.option("--json", "json_out", is_flag=True,
                     help="Print the summary as one JSON object on stdout (stage, out, skipped, seconds, "
                          "and the command's own fields)."),
    ]

    def decorate(f):
        for o in reversed(opts):
            f = o(f)
        return f

    return decorate


def stage_options(f):
    """--out, --shard and the common options: the table stages' contract."""
    opts = [
        click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                     help="Output directory (created; completed shards in it are skipped)."),
        click.option("--shard", default=None, metavar="I/N",
                     show_default="$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT if set, else 0/1",
                     help="Process shard I of N (rows split by prompt_id)."),
        click.option("--allow-failures", is_flag=True,
                     help="Write the output even when every row failed (otherwise: exit code 3, nothing written)."),
    ]
    f = common_options(seed_help="Random seed.", overwrite_help="Redo the shard even if complete.")(f)
    for o in reversed(opts):
        f = o(f)
    return f


def pop_stage_options(kw: dict) -> StageOptions:
    """The --out/--shard/--seed/--overwrite/--quiet/--json values, taken out of a command's kwargs."""
    return StageOptions(out=kw.pop("out"), shard=parse_shard(kw.pop("shard")), overwrite=kw.pop("overwrite"),
                        seed=kw.pop("seed"), quiet=kw.pop("quiet"), json=kw.pop("json_out"),
                        allow_failures=kw.pop("allow_failures"))


def pop_common_options(kw: dict, out=None) -> StageOptions:
    """The common option values of a command without --shard (shard 0/1), and its output path."""
    return StageOptions(out=out, overwrite=kw.pop("overwrite", False), seed=kw.pop("seed"), quiet=kw.pop("quiet"),
                        json=kw.pop("json_out"))


def report(result: dict, opts: StageOptions, *, stage: str | None = None, started: float | None = None,
           line_keys: tuple[str, ...] = ()) -> None:
    """Print a command's summary: the stage's result with the keys every summary has - stage,
    out, skipped (False unless the stage says so), seconds (the command's wall time since
    `started` unless the stage measured its own) - then the stage's own fields. With --json all of
    it is one JSON object on stdout; otherwise, unless --quiet, one line on stderr: stage, shard,
    rows, the command's line_keys (a dotted key reads a nested dict), skipped, seconds, out."""
    summary = {"stage": stage, "out": None if opts.out is None else str(opts.out), "skipped": False,
               "seconds": None if started is None else round(time.time() - started, 2), **result}
    if opts.json:
        click.echo(jsonlib.dumps(summary, sort_keys=True, default=str))
    elif not opts.quiet:
        keys = ("stage", "shard", "rows", "failed_rows", *line_keys, "skipped", "seconds", "out")
        fields = ((k, _lookup(summary, k)) for k in keys)
        click.echo(" ".join(f"{k}={_fmt(v)}" for k, v in fields if v is not None), err=True)


def _lookup(summary: dict, key: str):
    value = summary
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                       errno.EISDIR, errno.EEXIST}


def _fail(message: str, code: int = 2):
    ctx = click.get_current_context(silent=True)
    name = ctx.command_path if ctx else "rl3d"
    click.echo(f"{name}: error: {message}", err=True)
    sys.exit(code)


def handle_errors(f):
    """Bad input -> one line on stderr naming the file (and row), exit code 2."""

    @functools.wraps(f)
    def wrapper(*a, **kw):
        try:
            return f(*a, **kw)
        except InputError as e:
            _fail(str(e))
        except RowsFailed as e:  # well-formed input, but no row came out usable: a chain must stop here
            _fail(str(e), code=3)
        except OSError as e:
            # where the user's disk says no (read-only, full, over quota, a file where a dir goes): one
            # line naming the path; other OS errors are bugs and keep their traceback
            if e.filename is None or e.errno not in _ENVIRONMENT_ERRNOS:
                raise
            _fail(f"{e.filename}: {e.strerror}")

    return wrapper
