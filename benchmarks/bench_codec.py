"""Codec throughput: encode/decode grids per second, and codebook build time.

Compares, in the same run: encode_batch vs encoding one grid at a time, and the uint64
xor + popcount Hamming matcher vs matching on unpacked bits with a float matmul
(|a| + |b| - 2 a.b), the usual alternative.

    python benchmarks/bench_codec.py [--n 512] [--synth]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np


def best(fn, repeats=3):
    t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def matmul_match(codes: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    from rl3d.formats.codec import unpack_bits

    a, b = unpack_bits(codes).astype(np.float32), unpack_bits(patterns).astype(np.float32)
    d = a.sum(1, keepdims=True) + b.sum(1)[None] - 2 * a @ b.T
    return d.argmin(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512, help="grids to encode")
    ap.add_argument("--synth", action="store_true", help="use synth train objects instead of random shapes")
    a = ap.parse_args()

    from rl3d.formats.codec import VoxelCodec, grids_to_blocks, nearest_pattern, pack_bits

    if a.synth:
        from rl3d.stages.codec import synth_grids

        grids = synth_grids(a.n, 0, "train")
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_codec import random_shapes

        grids = random_shapes(a.n, seed=0)
    codec = VoxelCodec.load()
    print(f"{os.cpu_count()} cores; {len(grids)} grids; codebook {codec.n_patterns} patterns, vocab {codec.vocab_size}")

    t_build = best(lambda: VoxelCodec.build(grids, codec.n_patterns), 1)
    t_batch = best(lambda: codec.encode_batch(grids))
    t_single = best(lambda: [codec.encode(g) for g in grids], 1)
    tokens = codec.encode_batch(grids)
    t_dec = best(lambda: codec.decode_batch(tokens))
    print(f"build codebook      : {t_build * 1000:8.1f} ms for {len(grids)} grids")
    print(f"encode one at a time: {len(grids) / t_single:8.0f} grids/s")
    print(f"encode_batch        : {len(grids) / t_batch:8.0f} grids/s  ({t_single / t_batch:.1f}x)")
    print(f"decode_batch        : {len(grids) / t_dec:8.0f} grids/s")

    codes = pack_bits(grids_to_blocks(grids) > 0).ravel()
    codes = codes[codes != 0]
    t_pop = best(lambda: nearest_pattern(codes, codec.patterns))
    t_mm = best(lambda: matmul_match(codes, codec.patterns))
    same = (nearest_pattern(codes, codec.patterns)[0] == matmul_match(codes, codec.patterns)).mean()
    print(f"match {len(codes)} blocks: popcount {t_pop * 1000:.1f} ms, float matmul {t_mm * 1000:.1f} ms "
          f"({t_mm / t_pop:.1f}x), same choice {same:.4f}")


if __name__ == "__main__":
    main()
