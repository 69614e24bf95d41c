"""`rl3d codec build|stats`: build the voxel token codebook and measure round-trip quality."""
from __future__ import annotations

import time
from pathlib import Path

import click

from rl3d.cli.common import common_options, handle_errors, pop_common_options, report
from rl3d.cli.groups import SuggestingGroup

BUILD_EXAMPLES = """Examples:

\b
  rl3d codec build --n 3000 --seed 0 --patterns 1279 --eval-n 300 --out runs/codec   # as shipped
  rl3d codec build --n 200 --patterns 255 --eval-n 0 --out runs/codec-small
"""

STATS_EXAMPLES = """Examples:

\b
  rl3d codec stats --n 300 --seed 1            # the shipped codec on fresh eval-split objects
  rl3d codec stats --data runs/demo/prompts --codec runs/codec --json
"""


@click.group("codec", cls=SuggestingGroup, epilog="""Examples:

\b
  rl3d codec stats --n 20
  rl3d codec build --n 200 --patterns 255 --out runs/codec-small
""")
def command():
    """The embedded default 3D token codec (32^3 voxels <-> 512 tokens). See docs/codec.md."""


@command.command("build", epilog=BUILD_EXAMPLES)
@click.option("--n", "n", default=3000, show_default=True, type=int, help="Synth train objects to count patterns on.")
@click.option("--patterns", default=1279, show_default=True, type=int,
              help="Codebook size P, in 4^3 patterns (vocab = 1 + P * 16).")
@click.option("--eval-n", default=300, show_default=True, type=int,
              help="Eval-split objects to measure IoU / colour accuracy on (0 = skip).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write codebook.npz + codec.json into (codec.json last; a directory that has "
                   "it is skipped).")
@common_options(seed_help="Seed of the synth objects.",
                overwrite_help="Rebuild even if --out already holds a codebook.")
@handle_errors
def build_cmd(n, patterns, eval_n, out, **kw):
    """Build a codebook of the P most frequent 4^3 patterns of synth train objects."""
    from rl3d.stages import codec

    started = time.time()
    opts = pop_common_options(kw, out=out)
    result = codec.run_build(n, opts.seed, patterns, eval_n, out, overwrite=opts.overwrite, quiet=opts.quiet)
    report(result, opts, stage="codec-build", started=started,
           line_keys=("vocab_size", "content_hash", "train.voxel_iou", "eval.voxel_iou", "eval.color_accuracy"))


@command.command("stats", epilog=STATS_EXAMPLES)
@click.option("--data", default=None, type=click.Path(path_type=Path),
              show_default="freshly generated eval-split synth objects",
              help="Objects table (file, directory or glob) with a `voxels` column.")
@click.option("--codec", "codec_path", default=None, type=click.Path(path_type=Path),
              show_default="the shipped one", help="Codebook directory.")
@click.option("--n", "n", default=300, show_default=True, type=int, help="Eval objects to generate without --data.")
@common_options(seed_help="Seed of the generated objects (without --data).", overwrite_help=None)
@handle_errors
def stats_cmd(data, codec_path, n, **kw):
    """Voxel IoU and colour accuracy of encode -> decode round trips (writes nothing)."""
    from rl3d.stages import codec

    started = time.time()
    opts = pop_common_options(kw)
    report(codec.run_stats(data, codec_path, n, opts.seed), opts, stage="codec-stats", started=started,
           line_keys=("codec", "content_hash", "objects", "voxel_iou", "voxel_iou_p05", "color_accuracy",
                      "tokens_used"))
