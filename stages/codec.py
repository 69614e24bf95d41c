"""`rl3d codec build|stats|convert|hash`: build the voxel token codebook and measure its round-trip
quality; convert ShapeLLM-Omni's published 3DVQVAE.bin to the safetensors file rl3d loads; print a
codec's content hash (the `codec_hash` of rl3d_policy.json).

The codecs themselves are formats/codec.py (the embedded block codec) and formats/vqvae64.py (the
64^3 VQ-VAE's checkpoint file; its network is stages/codecs/vqvae64.py); this module only feeds them inputs: build and convert write a directory (DirJobs of the stage contract),
stats and hash write nothing and return the command's summary.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rl3d.formats.codec import STATS_FILE, VoxelCodec, grids_from_objects, grids_from_table, roundtrip_stats
from rl3d.formats import vqvae64
from rl3d.formats.codecs import codec_format
from rl3d.formats.errors import InputError
from rl3d.formats.shards import atomic_path
from rl3d.stages.contract import DirJob, Progress, StageOptions, read_json_record
from rl3d.stages.shapes.world import generate_objects


def synth_grids(n: int, seed: int, split: str):
    """Voxel grids of n procedural objects of one split (the synth stage's generator)."""
    return grids_from_objects(generate_objects(n, seed, split=split))


@dataclass
class CodecBuildOptions:
    n: int = 3000          # synth train objects to count patterns on
    patterns: int = 1279   # codebook size P, in 4^3 patterns
    eval_n: int = 300      # eval-split objects to measure on (0 = skip)
    seed: int = 0


class CodecBuildJob(DirJob):
    """A codebook of the `patterns` most frequent 4^3 patterns of n synth train objects, measured on the
    train objects and on eval_n eval objects. codec.json is written last; it records the job's config."""

    stage, marker, what = "codec-build", STATS_FILE, "a codebook"

    def __init__(self, options: CodecBuildOptions):
        if options.n < 1 or options.patterns < 1 or options.eval_n < 0:
            raise InputError(f"codec build: --n {options.n} and --patterns {options.patterns} must be >= 1, "
                             f"--eval-n {options.eval_n} >= 0")
        self.options = options

    def config(self) -> dict:
        return {"stage": self.stage, **asdict(self.options)}

    def recorded_config(self, out: Path) -> dict | None:
        return read_json_record(out / self.marker).get("config")

    def build(self, into: Path, opts: StageOptions, progress: Progress) -> dict:
        o = self.options
        train = synth_grids(o.n, o.seed, "train")
        codec = VoxelCodec.build(train, o.patterns)
        stats = {"train_objects": len(train), "seed": o.seed, "n_patterns": o.patterns,
                 "train": roundtrip_stats(codec, train)}
        if o.eval_n > 0:
            stats["eval"] = roundtrip_stats(codec, synth_grids(o.eval_n, o.seed, "eval"))
        codec.stats = {"built_with": f"rl3d codec build --n {o.n} --seed {o.seed} --patterns {o.patterns}",
                       "config": self.config(), **stats}
        codec.save(into)
        return {"vocab_size": codec.vocab_size, "content_hash": codec.content_hash(), **stats}


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


class CodecConvertJob(DirJob):
    """The published 3DVQVAE.bin (a torch pickle, read with weights_only=True) -> OUT/3DVQVAE.safetensors,
    its keys and shapes checked; the summary carries the content hash that rl3d_policy.json's codec_hash
    records. In place: OUT may hold other files (the .bin itself); the one file is written atomically."""

    stage, what, in_place = "codec-convert", "the converted checkpoint", True

    def __init__(self, src: Path):
        self.src = Path(src)
        if not self.src.is_file():
            raise InputError(f"{self.src}: no such file (the published 3DVQVAE.bin)")
        self.marker = vqvae64.CHECKPOINT_FILE

    def config(self) -> dict:
        return {"stage": self.stage, "src": str(self.src)}

    def skip(self, out: Path, progress: Progress) -> dict:
        return {"content_hash": vqvae64.file_hash(out / self.marker)}

    def build(self, into: Path, opts: StageOptions, progress: Progress) -> dict:
        dst = into / self.marker
        into.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:  # a killed conversion leaves no half-written checkpoint
            vqvae64.convert_bin_checkpoint(self.src, tmp)
        return {"checkpoint": str(dst), "content_hash": vqvae64.file_hash(dst)}


def run_hash(path: Path) -> dict:
    """The content hash of a codec: a VQ-VAE checkpoint (a dir holding 3DVQVAE.safetensors, or the file;
    keys and shapes checked by header, then the file hashed whole) or an embedded codebook dir."""
    t0 = time.time()
    header = codec_format(path).header(path)  # a VQ-VAE by header and a whole-file hash: no network built
    return {"stage": "codec-hash", "out": None, "skipped": False, "codec": str(path), "kind": header["kind"],
            "vocab_size": header["vocab_size"], "content_hash": header["content_hash"],
            "seconds": round(time.time() - t0, 2)}
