"""`rl3d codec build|stats|convert|hash`: build the voxel token codebook and measure its round-trip
quality; convert ShapeLLM-Omni's published 3DVQVAE.bin to the safetensors file rl3d loads; print a
codec's content hash (the `codec_hash` of rl3d_policy.json).

The codecs themselves are formats/codec.py (the embedded block codec) and formats/vqvae64.py (the
64^3 VQ-VAE); this module only feeds them inputs and returns the command's summary.
"""
from __future__ import annotations

import time
from pathlib import Path

from rl3d.formats.codec import STATS_FILE, VoxelCodec, grids_from_objects, grids_from_table, roundtrip_stats
from rl3d.formats.codecs import VQVAE64, codec_kind
from rl3d.formats.errors import InputError
from rl3d.formats.shards import atomic_path
from rl3d.stages.contract import Progress
from rl3d.stages.shapes.world import generate_objects


def synth_grids(n: int, seed: int, split: str):
    """Voxel grids of n procedural objects of one split (the synth stage's generator)."""
    return grids_from_objects(generate_objects(n, seed, split=split))


def run_build(n: int, seed: int, patterns: int, eval_n: int, out: Path, overwrite: bool = False,
              quiet: bool = False) -> dict:
    """Build a codebook of the `patterns` most frequent 4^3 patterns of n synth train objects into
    out; measure it on the train objects and on eval_n eval objects (0 = skip). A directory that
    already holds a codebook (its codec.json is written last) is kept unless overwrite."""
    t0 = time.time()
    out = Path(out)
    if (out / STATS_FILE).is_file() and not overwrite:
        Progress(quiet).log(f"codec build: {out} already holds a codebook, skipping (use --overwrite to rebuild)")
        return {"stage": "codec-build", "out": str(out), "skipped": True, "seconds": round(time.time() - t0, 2)}
    train = synth_grids(n, seed, "train")
    codec = VoxelCodec.build(train, patterns)
    stats = {"train_objects": len(train), "seed": seed, "n_patterns": patterns,
             "train": roundtrip_stats(codec, train)}
    if eval_n > 0:
        stats["eval"] = roundtrip_stats(codec, synth_grids(eval_n, seed, "eval"))
    codec.stats = {"built_with": f"rl3d codec build --n {n} --seed {seed} --patterns {patterns}", **stats}
    codec.save(out)
    return {"stage": "codec-build", "out": str(out), "skipped": False, "vocab_size": codec.vocab_size,
            "content_hash": codec.content_hash(), "seconds": round(time.time() - t0, 2), **stats}


def run_stats(data: Path | None, codec_path: Path | None, n: int, seed: int) -> dict:
    """Voxel IoU and colour accuracy of encode -> decode round trips of an objects table's grids
    (or, without data, of n fresh eval-split synth objects)."""
    t0 = time.time()
    codec = load_codec(codec_path)
    grids = grids_from_table(data) if data is not None else synth_grids(n, seed, "eval")
    return {"stage": "codec-stats", "out": None, "skipped": False, "codec": str(codec_path or "shipped"),
            "content_hash": codec.content_hash(), "vocab_size": codec.vocab_size, **roundtrip_stats(codec, grids),
            "seconds": round(time.time() - t0, 2)}


def load_codec(path: Path | None) -> VoxelCodec:
    """The codebook in path (None: the shipped one); a missing or bad one is an input error."""
    try:
        return VoxelCodec.load(path)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(str(e)) from None


def run_convert(src: Path, out: Path, overwrite: bool = False) -> dict:
    """The published 3DVQVAE.bin (a torch pickle, read with weights_only=True) -> out/3DVQVAE.safetensors,
    its keys and shapes checked; the summary carries the content hash that rl3d_policy.json's codec_hash
    records. An out dir already holding the file is kept unless overwrite."""
    from rl3d.formats import vqvae64  # lazy: torch

    t0 = time.time()
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise InputError(f"{src}: no such file (the published 3DVQVAE.bin)")
    dst = out / vqvae64.CHECKPOINT_FILE
    if dst.is_file() and not overwrite:
        return {"stage": "codec-convert", "out": str(out), "skipped": True, "content_hash": vqvae64.file_hash(dst),
                "seconds": round(time.time() - t0, 2)}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:  # a killed conversion leaves no half-written checkpoint
        vqvae64.convert_bin_checkpoint(src, tmp)
    return {"stage": "codec-convert", "out": str(out), "skipped": False, "checkpoint": str(dst),
            "content_hash": vqvae64.file_hash(dst), "seconds": round(time.time() - t0, 2)}


def run_hash(path: Path) -> dict:
    """The content hash of a codec: a VQ-VAE checkpoint (a dir holding 3DVQVAE.safetensors, or the file;
    keys and shapes checked by header, then the file hashed whole) or an embedded codebook dir."""
    t0 = time.time()
    if codec_kind(path) == VQVAE64:
        from rl3d.formats import vqvae64  # lazy: torch

        f, config = vqvae64.check_checkpoint(path)
        kind, digest, vocab = "vqvae64", vqvae64.file_hash(f), config.num_embeddings
    else:
        codec = load_codec(path)
        kind, digest, vocab = "voxel", codec.content_hash(), codec.vocab_size
    return {"stage": "codec-hash", "out": None, "skipped": False, "codec": str(path), "kind": kind,
            "vocab_size": vocab, "content_hash": digest, "seconds": round(time.time() - t0, 2)}
