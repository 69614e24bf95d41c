"""The embedded default 3D token codec: a 32^3 palette voxel grid <-> 512 tokens.

The grid is cut into 8x8x8 blocks of 4^3 voxels, in raster order (x, then y, then z fastest).
Each block becomes one token:
    0                                  empty block
    1 + pattern * NUM_COLORS + (c - 1) occupancy pattern `pattern` of the codebook, palette colour c
The codebook holds the most frequent 4^3 occupancy patterns of a training set (always including
the full block); a block is matched to the pattern (or to the empty block) at the smallest
Hamming distance and takes its majority colour. A pattern is the block's 64 occupancy bits
packed into one uint64 (bit ix*16 + iy*4 + iz), so matching is xor + popcount on uint64.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from rl3d.formats.errors import InputError
from rl3d.formats.shards import atomic_path, atomic_write_json
from rl3d.formats.tables import list_parts
from rl3d.formats.voxels import NUM_COLORS, RESOLUTION, color_accuracy, from_bytes, voxel_iou

MESH_START = "<mesh-start>"
MESH_END = "<mesh-end>"
CODEBOOK_FILE = "codebook.npz"
STATS_FILE = "codec.json"
BLOCK = 4
FULL_BLOCK = np.uint64(0xFFFFFFFFFFFFFFFF)
_MATCH_CHUNK = 1 << 20  # block x pattern pairs per xor/popcount chunk (bounds memory)


def mesh_token_text(i: int) -> str:
    return f"<mesh{int(i)}>"


class CodecError(ValueError):
    """Tokens that do not decode: wrong length or ids outside the vocabulary."""


# ---- grid <-> blocks <-> packed bits -------------------------------------------------------

def grids_to_blocks(grids: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """uint8[B, R, R, R] -> uint8[B, (R/b)^3, b^3], blocks in raster order, voxels ix, iy, iz."""
    b, r = grids.shape[0], grids.shape[1]
    n = r // block
    x = grids.reshape(b, n, block, n, block, n, block).transpose(0, 1, 3, 5, 2, 4, 6)
    return np.ascontiguousarray(x).reshape(b, n ** 3, block ** 3)


def blocks_to_grids(blocks: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Inverse of grids_to_blocks."""
    b, nb = blocks.shape[:2]
    n = round(nb ** (1 / 3))
    x = blocks.reshape(b, n, n, n, block, block, block).transpose(0, 1, 4, 2, 5, 3, 6)
    return np.ascontiguousarray(x).reshape(b, n * block, n * block, n * block)


def pack_bits(occ: np.ndarray) -> np.ndarray:
    """bool[..., 64] -> uint64[...] (bit i = voxel i)."""
    by = np.packbits(occ.astype(np.uint8), axis=-1, bitorder="little")
    return np.ascontiguousarray(by).view("<u8")[..., 0].astype(np.uint64)


def unpack_bits(codes: np.ndarray) -> np.ndarray:
    """uint64[...] -> bool[..., 64]."""
    by = np.ascontiguousarray(codes.astype("<u8"))[..., None].view(np.uint8)
    return np.unpackbits(by, axis=-1, bitorder="little").astype(bool)


def majority_colour(blocks: np.ndarray) -> np.ndarray:
    """uint8[N, 64] -> uint8[N] most frequent non-zero colour (lowest id on ties; 0 if empty)."""
    n = len(blocks)
    k = NUM_COLORS + 1
    flat = (np.arange(n, dtype=np.int64)[:, None] * k + blocks).ravel()
    counts = np.bincount(flat, minlength=n * k).reshape(n, k)[:, 1:]  # [N, 16] per-colour counts
    return np.where(counts.max(-1) > 0, counts.argmax(-1) + 1, 0).astype(np.uint8)


def nearest_pattern(codes: np.ndarray, patterns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the pattern at the smallest Hamming distance for each code, and that distance.

    Chunked over codes so a large training set never builds an N x P temporary all at once.
    """
    idx = np.empty(len(codes), np.int64)
    dist = np.empty(len(codes), np.int64)
    step = max(1, _MATCH_CHUNK // max(1, len(patterns)))
    for s in range(0, len(codes), step):
        d = np.bitwise_count(codes[s:s + step, None] ^ patterns[None, :])
        idx[s:s + step] = d.argmin(1)
        dist[s:s + step] = np.take_along_axis(d, idx[s:s + step, None], 1)[:, 0]
    return idx, dist


def decode_one(codec, tokens) -> np.ndarray:
    """One shape's 1-D token sequence -> its grid, through the codec's batched decode (every codec's
    `decode`)."""
    t = np.asarray(tokens)
    if t.ndim != 1:
        raise CodecError(f"expected a 1-D sequence of {codec.seq_len} mesh tokens, got shape {t.shape}")
    return codec.decode_batch(t[None])[0]


def check_tokens(tokens: np.ndarray, seq_len: int, vocab_size: int) -> np.ndarray:
    """[B, seq_len] token ids in [0, vocab_size) as int64; CodecError otherwise (every codec decodes through it)."""
    t = np.asarray(tokens)
    if t.ndim != 2 or t.shape[1] != seq_len:
        raise CodecError(f"expected {seq_len} mesh tokens per shape, got shape {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        raise CodecError(f"mesh token ids must be in [0, {vocab_size}), got [{t.min()}, {t.max()}]")
    return t.astype(np.int64)


class VoxelCodec:
    """The embedded block codec (a formats.codecs.Codec): numpy only, so it is its own format class."""
    kind = "voxel"
    resolution = RESOLUTION
    block = BLOCK
    seq_len = (RESOLUTION // BLOCK) ** 3
    coloured = True    # each token carries a palette colour
    network = False
    external = False   # small: a policy keeps a copy under codec/

    def __init__(self, patterns: np.ndarray, stats: dict | None = None):
        patterns = np.asarray(patterns, np.uint64)
        if patterns.ndim != 1 or len(patterns) == 0:
            raise ValueError("codebook needs a non-empty 1-D array of uint64 patterns")
        self.patterns = patterns
        self.stats = dict(stats or {})
        self.vocab_size = 1 + len(patterns) * NUM_COLORS
        self._occ = unpack_bits(patterns)  # bool[P, 64] decode lookup

    @property
    def n_patterns(self) -> int:
        return len(self.patterns)

    # ---- the format (formats/codecs.py) ----
    @classmethod
    def recognises(cls, path: str | os.PathLike | None) -> bool:
        """Any path: the block codec is the format a path names when no other recognises it, so a
        wrong path gets its "codebook not found" error."""
        return True

    @classmethod
    def open(cls, path: str | os.PathLike | None, device: str | None = None) -> "VoxelCodec":
        """The codebook at `path` (None = shipped); InputError naming the path when missing or
        unreadable. `device` is accepted for the Codec interface: the block codec is numpy."""
        try:
            return cls.load(path)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(f"codec {path or '(shipped)'}: {e}") from None

    @classmethod
    def seq_len_at(cls, path: str | os.PathLike | None) -> int:
        return cls.open(path).seq_len  # the codebook is small: read and checked

    @classmethod
    def header(cls, path: str | os.PathLike | None) -> dict:
        try:
            codec = cls.load(path)
        except (FileNotFoundError, ValueError) as e:
            raise InputError(str(e)) from None
        return {"kind": cls.kind, "vocab_size": codec.vocab_size, "content_hash": codec.content_hash()}

    # ---- persistence ----
    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "VoxelCodec":
        """A codebook dir (or its codebook.npz); None = the one shipped in rl3d.assets/codec."""
        if path is None:
            from importlib.resources import files

            path = Path(str(files("rl3d.assets") / "codec"))
        p = Path(path)
        f = p / CODEBOOK_FILE if p.is_dir() or p.suffix != ".npz" else p
        if not f.is_file():
            raise FileNotFoundError(f"codec codebook not found: {f} (build one with `rl3d codec build`)")
        with np.load(f) as z:
            if "patterns" not in z or int(z["resolution"]) != cls.resolution or int(z["block"]) != cls.block:
                raise ValueError(f"{f}: not a {cls.resolution}^3/{cls.block}^3 voxel codebook")
            patterns = z["patterns"].astype(np.uint64)
        stats_f = f.with_name(STATS_FILE)
        stats = json.loads(stats_f.read_text()) if stats_f.is_file() else {}
        return cls(patterns, stats)

    def save(self, out: str | os.PathLike) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / CODEBOOK_FILE) as tmp:
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, patterns=self.patterns, resolution=np.int32(self.resolution),
                                    block=np.int32(self.block))
        atomic_write_json(out / STATS_FILE, {**self.stats, "n_patterns": self.n_patterns,
                                             "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                                             "content_hash": self.content_hash()})
        return out

    def content_hash(self) -> str:
        h = hashlib.sha256(f"voxel-codec:{self.resolution}:{self.block}:".encode())
        h.update(self.patterns.astype("<u8").tobytes())
        return h.hexdigest()[:16]

    # ---- building ----
    @classmethod
    def build(cls, grids: np.ndarray, n_patterns: int, stats: dict | None = None) -> "VoxelCodec":
        """The n_patterns most frequent non-empty block patterns of `grids` (full block always in)."""
        if n_patterns < 1:
            raise ValueError("n_patterns must be >= 1")
        grids = np.asarray(grids, np.uint8)
        codes = pack_bits(grids_to_blocks(grids) > 0).ravel()
        codes = codes[codes != 0]
        uniq, counts = np.unique(codes, return_counts=True)
        order = np.lexsort((uniq, -counts))  # by count desc, then code: deterministic
        top = uniq[order][:n_patterns]
        if FULL_BLOCK not in top:
            top = np.concatenate([top[:n_patterns - 1], [FULL_BLOCK]])
        if len(top) < n_patterns:  # tiny training sets: pad with single-voxel patterns
            extra = [np.uint64(1) << np.uint64(i) for i in range(64)]
            extra = np.array([e for e in extra if e not in top], np.uint64)
            top = np.concatenate([top, extra[:n_patterns - len(top)]])
        return cls(top.astype(np.uint64), stats)

    # ---- tokens ----
    def encode_batch(self, grids: np.ndarray) -> np.ndarray:
        grids = np.asarray(grids)
        r = self.resolution
        if grids.ndim != 4 or grids.shape[1:] != (r, r, r):
            raise ValueError(f"expected grids of shape [B, {r}, {r}, {r}], got {grids.shape}")
        blocks = grids_to_blocks(grids.astype(np.uint8)).reshape(-1, self.block ** 3)
        codes = pack_bits(blocks > 0)
        tokens = np.zeros(len(codes), np.int32)
        nz = np.flatnonzero(codes)
        if len(nz):
            pidx, dist = nearest_pattern(codes[nz], self.patterns)
            # the empty block is a candidate too: a stray voxel or two is cheaper dropped
            keep = dist <= np.bitwise_count(codes[nz]).astype(np.int64)
            colour = majority_colour(blocks[nz]).astype(np.int64)
            tokens[nz] = np.where(keep, 1 + pidx * NUM_COLORS + (colour - 1), 0)
        return tokens.reshape(len(grids), self.seq_len)

    def encode(self, grid: np.ndarray) -> np.ndarray:
        return self.encode_batch(np.asarray(grid)[None])[0]

    def decode_batch(self, tokens: np.ndarray) -> np.ndarray:
        t = check_tokens(tokens, self.seq_len, self.vocab_size)
        pidx = np.maximum(t - 1, 0) // NUM_COLORS
        colour = np.where(t > 0, (t - 1) % NUM_COLORS + 1, 0).astype(np.uint8)
        blocks = self._occ[pidx] * colour[..., None]  # [B, 512, 64]
        return blocks_to_grids(blocks.astype(np.uint8))

    def decode(self, tokens) -> np.ndarray:
        return decode_one(self, tokens)

    def __repr__(self) -> str:
        return f"VoxelCodec(n_patterns={self.n_patterns}, vocab_size={self.vocab_size}, hash={self.content_hash()})"


# ---- quality measurement and data loading (used by `rl3d codec`) ---------------------------

def roundtrip_stats(codec: VoxelCodec, grids: np.ndarray, batch: int = 256) -> dict:
    """Mean voxel IoU / colour accuracy of decode(encode(grid)), plus the token statistics."""

    ious, accs, empty, used = [], [], 0, np.zeros(codec.vocab_size, bool)
    for s in range(0, len(grids), batch):
        g = np.asarray(grids[s:s + batch], np.uint8)
        tok = codec.encode_batch(g)
        dec = codec.decode_batch(tok)
        ious += [voxel_iou(d, t) for d, t in zip(dec, g)]
        accs += [color_accuracy(d, t) for d, t in zip(dec, g)]
        empty += int((tok == 0).sum())
        used[np.unique(tok)] = True
    n = max(1, len(ious))
    return {"objects": len(ious), "voxel_iou": float(np.mean(ious)) if ious else float("nan"),
            "voxel_iou_p05": float(np.percentile(ious, 5)) if ious else float("nan"),
            "color_accuracy": float(np.mean(accs)) if accs else float("nan"),
            "empty_token_fraction": empty / (n * codec.seq_len), "tokens_used": int(used.sum())}


def grids_from_objects(objects) -> np.ndarray:
    """uint8[B, 32, 32, 32] from an objects table (pyarrow, `voxels` bytes column), a list of
    rows / objects with a `grid` array or `voxels` bytes, or an array of grids."""

    if isinstance(objects, np.ndarray):
        return objects.astype(np.uint8)
    if hasattr(objects, "column_names"):  # pyarrow.Table
        if "voxels" not in objects.column_names:
            raise ValueError("objects table has no 'voxels' column")
        ok = objects.column("status").to_pylist() if "status" in objects.column_names else None
        vals = [v for i, v in enumerate(objects.column("voxels").to_pylist()) if v and (ok is None or ok[i] == "ok")]
    else:
        vals = [_object_grid(o) for o in objects]
    grids = [from_bytes(v) if isinstance(v, (bytes, bytearray)) else np.asarray(v, np.uint8) for v in vals]
    return np.stack(grids) if grids else np.zeros((0, RESOLUTION, RESOLUTION, RESOLUTION), np.uint8)


def _object_grid(o):
    """A row dict or an object (e.g. stages.synth.SynthObject) holding `grid` or `voxels`."""
    for key in ("grid", "voxels"):
        v = o.get(key) if isinstance(o, dict) else getattr(o, key, None)
        if v is not None:
            return v
    raise ValueError(f"object {type(o).__name__} has neither 'grid' nor 'voxels'")


def grids_from_table(path: str | os.PathLike) -> np.ndarray:
    """Grids of an objects table on disk (file, dir of parts or glob); InputError when unreadable."""
    import pyarrow as pa
    import pyarrow.parquet as pq


    parts = []
    for f in list_parts(path):
        try:
            names = pq.read_schema(f).names
            parts.append(pq.read_table(f, columns=[c for c in ("voxels", "status") if c in names]))
        except Exception as e:
            raise InputError(f"{f}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        if "voxels" not in names:
            raise InputError(f"{f}: missing column 'voxels' (need an objects table from `rl3d synth`)")
    try:
        return grids_from_objects(pa.concat_tables(parts, promote_options="default"))
    except ValueError as e:
        raise InputError(f"{path}: {e}") from None
