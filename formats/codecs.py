"""Which codec a path names: rl3d's embedded 32^3 block codec (formats/codec.py, a codebook.npz)
or the ShapeLLM-Omni 64^3 VQ-VAE (formats/vqvae64.py, a 3DVQVAE.safetensors). Both have the same
interface (seq_len, vocab_size, resolution, encode/decode/decode_batch, content_hash), so callers
that only decode and encode tokens take either from here.
"""
from __future__ import annotations

import os
from pathlib import Path

from rl3d.formats.codec import VoxelCodec
from rl3d.formats.errors import InputError

VOXEL, VQVAE64 = "voxel", "vqvae64"
# formats/vqvae64.py (and with it torch) is imported only where a VQ-VAE is named: reward and the
# block codec's users stay free of torch


def codec_kind(path: str | os.PathLike | None) -> str:
    """"vqvae64" for a .safetensors / .bin file or a dir holding 3DVQVAE.safetensors, else "voxel"
    (None = the shipped block codec)."""
    if path is None:
        return VOXEL
    from rl3d.formats.vqvae64 import CHECKPOINT_FILE  # lazy: see above

    p = Path(path)
    if p.suffix in (".safetensors", ".bin") or (p.is_dir() and (p / CHECKPOINT_FILE).is_file()):
        return VQVAE64
    return VOXEL


def load_codec(path: str | os.PathLike | None, device: str | None = None):
    """The codec at `path` (None = the shipped block codec); InputError naming the path when it is
    missing or unreadable. `device`: where the VQ-VAE runs (the block codec is numpy)."""
    if codec_kind(path) == VQVAE64:
        from rl3d.formats.vqvae64 import VQVAE64Codec  # lazy: see above

        return VQVAE64Codec.load(path, device=device or "cpu")
    try:
        return VoxelCodec.load(path)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"codec {path or '(shipped)'}: {e}") from None


def codec_seq_len(path: str | os.PathLike | None) -> int:
    """Mesh tokens per shape of the codec at `path`, without loading VQ-VAE weights (a 533 MB read
    that a length check before any work should not pay)."""
    if codec_kind(path) == VQVAE64:
        from rl3d.formats.vqvae64 import SEQ_LEN  # lazy: see above

        return SEQ_LEN
    return load_codec(path).seq_len  # the block codec's codebook is small


def is_external(codec) -> bool:
    """True for a codec a policy references by path instead of copying (the published VQ-VAE
    is 533 MB: every checkpoint of a run points at the one file)."""
    from rl3d.formats.vqvae64 import VQVAE64Codec  # lazy: see above

    return isinstance(codec, VQVAE64Codec) and bool(codec.source) and Path(codec.source).is_file()
