"""`rl3d codec build|stats|convert|hash`: build the voxel token codebook and measure round-trip quality;
convert the published ShapeLLM-Omni VQ-VAE to safetensors; print a codec's content hash."""
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
  rl3d codec convert 3DVQVAE.bin models/vqvae
  rl3d codec hash models/vqvae
""")
def command():
    """3D token codecs: the embedded default (32^3 voxels <-> 512 tokens: build, stats) and
    ShapeLLM-Omni's 64^3 VQ-VAE (convert), and the content hash of either (hash). See docs/codec.md."""


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
    from rl3d.stages.codec import CodecBuildJob, CodecBuildOptions

    started = time.time()
    opts = pop_common_options(kw, out=out)
    result = CodecBuildJob(CodecBuildOptions(n, patterns, eval_n, opts.seed)).run(opts)
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


@command.command("convert", epilog="""Examples:

\b
  rl3d codec convert downloads/3DVQVAE.bin models/vqvae      # -> models/vqvae/3DVQVAE.safetensors
""")
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path), metavar="BIN")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), metavar="OUT_DIR")
@common_options(seed_help="Ignored (the conversion is exact).",
                overwrite_help="Convert again even if OUT_DIR already holds the checkpoint.")
@handle_errors
def convert_cmd(src, out, **kw):
    """Convert ShapeLLM-Omni's published 3DVQVAE.bin (a torch pickle, read with weights_only=True: no
    code runs) to OUT_DIR/3DVQVAE.safetensors, checking every key and shape; prints the content hash
    that rl3d_policy.json's codec_hash records (docs/checkpoints.md)."""
    from rl3d.stages.codec import CodecConvertJob

    started = time.time()
    opts = pop_common_options(kw, out=out)
    report(CodecConvertJob(src).run(opts), opts, stage="codec-convert", started=started,
           line_keys=("checkpoint", "content_hash"))


@command.command("hash", epilog="""Examples:

\b
  rl3d codec hash models/vqvae            # a converted VQ-VAE (dir or .safetensors file)
  rl3d codec hash runs/codec-small        # an embedded codebook dir
""")
@click.argument("path", type=click.Path(exists=True, path_type=Path), metavar="CODEC")
@common_options(seed_help="Ignored (hashing is exact).", overwrite_help=None)
@handle_errors
def hash_cmd(path, **kw):
    """Print the content hash of a codec, the value rl3d_policy.json's codec_hash must hold: a VQ-VAE
    checkpoint (dir holding 3DVQVAE.safetensors, or the file; read whole) or a codebook dir."""
    from rl3d.stages import codec

    started = time.time()
    opts = pop_common_options(kw)
    result = codec.run_hash(path)
    if not opts.json:  # the hash alone on stdout, for scripts: codec_hash=$(rl3d codec hash DIR --quiet)
        click.echo(result["content_hash"])
    report(result, opts, stage="codec-hash", started=started, line_keys=("kind", "vocab_size", "content_hash"))
