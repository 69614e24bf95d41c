"""ShapeLLM-Omni VQ-VAE codec speed: decode (1,024 tokens -> 64^3 occupancy) and encode, per batch size.

Random-init weights at the published size (channels 32/128/512, 8192 x 32 codebook) unless
--ckpt points at a converted checkpoint; the speed does not depend on the weights.

    python benchmarks/bench_vqvae64.py [--device cpu|cuda] [--dtype float32|bfloat16] [--batches 1,16] [--ckpt DIR]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def timed(fn, repeats: int, sync, warmup: bool) -> float:
    if warmup:  # allocator, cuDNN autotune; on CPU the first call is already representative
        fn()
        sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    from rl3d.stages.codecs.vqvae64 import VQVAE3D, VQVAE64Codec

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--encode", action="store_true", help="time encode too")
    ap.add_argument("--ckpt", default=None)
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    if args.ckpt:
        codec = VQVAE64Codec.load(args.ckpt, device=args.device, dtype=dtype)
    else:
        torch.manual_seed(0)
        codec = VQVAE64Codec(VQVAE3D().to(args.device, dtype))
    gpu = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    rng = np.random.default_rng(0)
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()}")
    for b in [int(x) for x in args.batches.split(",")]:
        codec.batch_size = b
        tokens = rng.integers(0, codec.vocab_size, (b, codec.seq_len))
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        t = timed(lambda: codec.decode_batch(tokens), args.repeats, sync, gpu)
        mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if gpu else ""
        print(f"decode batch {b:3d}: {t:7.2f} s  ({t / b:.3f} s/shape{mem})")
        if args.encode:
            grids = codec.decode_batch(tokens)
            t = timed(lambda: codec.encode_batch(grids), args.repeats, sync, gpu)
            print(f"encode batch {b:3d}: {t:7.2f} s  ({t / b:.3f} s/shape)")


if __name__ == "__main__":
    main()
