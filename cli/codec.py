"""`rl3d codec build|stats`: build the voxel token codebook and measure round-trip quality."""
from __future__ import annotations

import json
from pathlib import Path

import click

from rl3d.cli.common import handle_errors


@click.group("codec")
def command():
    """The embedded default 3D token codec (32^3 voxels <-> 512 tokens)."""


@command.command("build")
@click.option("--n", "n", default=3000, show_default=True, type=int, help="Synth train objects to count patterns on.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the synth objects.")
@click.option("--patterns", default=1279, show_default=True, type=int,
              help="Codebook size P (vocab = 1 + P * 16).")
@click.option("--eval-n", default=300, show_default=True, type=int,
              help="Eval-split objects to measure IoU / colour accuracy on (0 = skip).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write codebook.npz + codec.json into.")
@click.option("--json", "json_out", is_flag=True, help="Print the stats as JSON on stdout.")
@handle_errors
def build_cmd(n, seed, patterns, eval_n, out, json_out):
    """Build a codebook of the P most frequent 4^3 patterns of synth train objects."""
    import time

    from rl3d.formats.codec import VoxelCodec, roundtrip_stats

    t0 = time.time()
    train = synth_grids(n, seed, "train")
    codec = VoxelCodec.build(train, patterns)
    stats = {"train_objects": len(train), "seed": seed, "n_patterns": patterns,
             "train": roundtrip_stats(codec, train)}
    if eval_n > 0:
        stats["eval"] = roundtrip_stats(codec, synth_grids(eval_n, seed, "eval"))
    codec.stats = {"built_with": f"rl3d codec build --n {n} --seed {seed} --patterns {patterns}", **stats}
    codec.save(out)
    _print({"out": str(out), "vocab_size": codec.vocab_size, "content_hash": codec.content_hash(),
            "seconds": round(time.time() - t0, 2), **stats}, json_out)


@command.command("stats")
@click.option("--data", default=None, type=click.Path(path_type=Path),
              help="Objects table (file, directory or glob) with a `voxels` column. "
                   "Default: freshly generated eval-split synth objects.")
@click.option("--codec", "codec_path", default=None, type=click.Path(path_type=Path),
              help="Codebook directory (default: the shipped one).")
@click.option("--n", "n", default=300, show_default=True, type=int, help="Eval objects to generate without --data.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "json_out", is_flag=True, help="Print the stats as JSON on stdout.")
@handle_errors
def stats_cmd(data, codec_path, n, seed, json_out):
    """Voxel IoU and colour accuracy of encode -> decode round trips."""
    from rl3d.formats.codec import grids_from_table, roundtrip_stats

    codec = _load(codec_path)
    grids = grids_from_table(data) if data is not None else synth_grids(n, seed, "eval")
    stats = {"codec": str(codec_path or "shipped"), "content_hash": codec.content_hash(),
             "vocab_size": codec.vocab_size, **roundtrip_stats(codec, grids)}
    _print(stats, json_out)


def synth_grids(n: int, seed: int, split: str):
    """Voxel grids of n procedural objects of one split (the synth stage's generator)."""
    from rl3d.formats.codec import grids_from_objects
    from rl3d.stages.synth import generate_objects

    return grids_from_objects(generate_objects(n, seed, split=split))


def _load(path):
    from rl3d.formats.codec import VoxelCodec
    from rl3d.formats.errors import InputError

    try:
        return VoxelCodec.load(path)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None


def _print(stats: dict, json_out: bool) -> None:
    if json_out:
        click.echo(json.dumps(stats, sort_keys=True))
    else:
        for k, v in stats.items():
            if isinstance(v, dict):
                v = " ".join(f"{a}={b:.4f}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
            click.echo(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
