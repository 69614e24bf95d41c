"""Device and dtype selection, one rule for every command: CUDA when available, else CPU; bf16
on CUDA, fp32 on CPU; an explicit --device / --dtype wins and is checked."""
from __future__ import annotations

import torch

from rl3d.formats.errors import InputError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_device(device: str | None = None) -> str:
    """None or "auto": "cuda" when available, else "cpu". A name given must be a torch device
    (cpu, cuda, cuda:1, ...) that this machine has."""
    if not device or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    return str(dev)


def resolve_device_dtype(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA + bf16 when available, else CPU + fp32; explicit flags override."""
    dev = torch.device(pick_device(device))
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        dt = DTYPES[dtype]
    else:
        raise InputError(f"--dtype {dtype!r}: expected one of {', '.join(sorted(DTYPES))}")
    return dev, dt


def no_cudnn_attention() -> None:
    """Turn off SDPA's cuDNN backend for this process (the memory-efficient, flash and math kernels
    stay). For the whole process, not a context: rl3d train samples on one thread while it trains on
    another, and a context left on one thread would restore the backend under the other.

    Training: on H100/H200 with torch >= 2.11, cuDNN attention's backward returns NaN gradients
    when the sequence length is 64 mod 128 and a query row is fully masked, which every left-padded
    row is (pytorch/pytorch#196678): a micro-batch of width 704 made every gradient NaN and the
    update was skipped; which micro-batches hit such a width depends on how a minibatch is split,
    so one process and N processes skipped different updates.
    Sampling: turned off there too, for one rule per process. (The two copies of each layer's KV
    cache per decode step that a profile once put on cuDNN were transformers' repeat_kv: see
    policy/attention.py; the sampler's speed did not change with this switch.)"""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
