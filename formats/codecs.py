"""The 3D token codecs as the rest of rl3d sees them: the `Codec` protocol every codec implements,
the `CodecFormat` each declares for its files, and the one table that decides which codec a path
names (`codec_format`). The known codecs: rl3d's embedded 32^3 block codec (formats/codec.py
`VoxelCodec`, a codebook.npz; numpy, decodes itself) and ShapeLLM-Omni's 64^3 VQ-VAE
(formats/vqvae64.py `VQVAE64Checkpoint`, a 3DVQVAE.safetensors; its torch network runs above this
layer, stages/codecs/vqvae64.py). Callers ask the codec (object or format) what they need - token
length, colours, whether a policy references it by path - and never test which codec it is.

Nothing here imports torch: choosing a codec, its token length and its header checks stay light.
"""
from __future__ import annotations

import os
from typing import ClassVar, Protocol

import numpy as np

from rl3d.formats.codec import VoxelCodec
from rl3d.formats.vqvae64 import VQVAE64Checkpoint


class CodecFormat(Protocol):
    """What a codec declares on its class, read without loading it (nothing but headers)."""
    kind: ClassVar[str]          # its name in summaries (`rl3d codec hash`); with `network`, the module
    #                              stages/codecs/<kind>.py that holds the codec class (CODEC)
    resolution: ClassVar[int]    # edge of the voxel grids it encodes and decodes
    coloured: ClassVar[bool]     # decodes palette colours (gen writes coloured meshes), else occupancy only
    network: ClassVar[bool]      # decoding runs a torch network kept above formats/ (stages/codecs/<kind>.py)
    external: ClassVar[bool]     # a policy references its files by path instead of copying them, and gen
    #                              records that path for reward (the published VQ-VAE is 533 MB)

    @classmethod
    def recognises(cls, path: str | os.PathLike | None) -> bool:
        """True when `path` (None = the shipped codec) holds this codec's files."""

    @classmethod
    def seq_len_at(cls, path: str | os.PathLike | None) -> int:
        """Mesh tokens per shape of the codec at `path`, without loading network weights."""

    @classmethod
    def header(cls, path: str | os.PathLike | None) -> dict:
        """{"kind", "vocab_size", "content_hash"} of the codec at `path`, checked by its files'
        headers (no network built); InputError naming the file when they are missing or wrong."""


class Codec(CodecFormat, Protocol):
    """A loaded codec: voxel grids (uint8[B, R, R, R], rl3d's frame) <-> token ids in [0, vocab_size),
    seq_len per shape. Decoding checks the tokens (formats.codec.CodecError on a wrong length or id).
    `external` may narrow per object: a network codec built in memory has no file to reference yet."""
    seq_len: int
    vocab_size: int

    @classmethod
    def open(cls, path: str | os.PathLike | None, device: str | None = None) -> "Codec":
        """The codec at `path`; InputError naming the path when it is missing or unreadable."""

    def encode(self, grid: np.ndarray) -> np.ndarray: ...
    def encode_batch(self, grids: np.ndarray) -> np.ndarray: ...
    def decode(self, tokens) -> np.ndarray: ...
    def decode_batch(self, tokens: np.ndarray) -> np.ndarray: ...
    def content_hash(self) -> str: ...
    def save(self, out: str | os.PathLike): ...


# Every known codec format; the first that recognises a path names its codec. The block codec
# recognises any path (a dir or codebook.npz, None = shipped), so it stays last: its load errors
# are the ones a wrong path gets.
CODEC_FORMATS: tuple[type[CodecFormat], ...] = (VQVAE64Checkpoint, VoxelCodec)


def codec_format(path: str | os.PathLike | None) -> type[CodecFormat]:
    """The codec a path names (None = the shipped block codec)."""
    return next(f for f in CODEC_FORMATS if f.recognises(path))


def codec_seq_len(path: str | os.PathLike | None) -> int:
    """Mesh tokens per shape of the codec at `path`, without loading VQ-VAE weights (a 533 MB read
    that a length check before any work should not pay)."""
    return codec_format(path).seq_len_at(path)
