"""The ShapeLLM-Omni 3D VQ-VAE as torch code, and the codec that runs it: 1,024 tokens <-> a 64^3
occupancy grid.

The network is the TRELLIS sparse-structure conv encoder/decoder with a vector quantiser between
them (ShapeLLM-Omni's `VQVAE3D`, also vendored by 3DGen-R1). This is our own torch implementation;
its parameter names and shapes match the published checkpoint (formats/vqvae64.py `expected_shapes`,
the file contract), so the converted file loads with `load_state_dict(strict=True)`.
The checkpoint file, its header checks and its hash are formats/vqvae64.py; the token layout and
frames are described there too. This module is imported only where a VQ-VAE decodes or encodes
(stages/codecs `load_codec`), so torch loads with it and not before.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rl3d.formats.codec import check_tokens, decode_one
from rl3d.formats.occupancy import RESOLUTION, gltf_to_vq_frame, vq_to_gltf_frame
from rl3d.formats.vqvae64 import (CELLS_PER_TOKEN, LATENT_RESOLUTION, SEQ_LEN, VQVAE64Checkpoint, VQVAE64Config,
                                  describe_config, file_hash, read_weights, write_weights)


# ---- network (parameter names follow the published checkpoint) --------------------------------

class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of [B, C, ...], computed in float32 (as TRELLIS does)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.movedim(1, -1).float()
        h = F.layer_norm(h, h.shape[-1:], self.weight.float(), self.bias.float(), self.eps)
        return h.to(x.dtype).movedim(-1, 1)


class ResBlock3d(nn.Module):
    """norm -> silu -> conv, twice, plus the input. Every block keeps its width (no skip conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm(channels)
        self.norm2 = ChannelLayerNorm(channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Downsample3d(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def pixel_shuffle_3d(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """[B, C * f^3, D, H, W] -> [B, C, D*f, H*f, W*f]; input channel c * f^3 + (i * f + j) * f + k
    fills offset (i, j, k) of output channel c."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c // factor ** 3, factor, factor, factor, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // factor ** 3, d * factor, h * factor, w * factor)


class Upsample3d(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout * 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_3d(self.conv(x), 2)


def _out_layer(channels: int, out: int) -> nn.Sequential:
    return nn.Sequential(ChannelLayerNorm(channels), nn.SiLU(), nn.Conv3d(channels, out, 3, padding=1))


def _levels(channels: tuple[int, ...], res_blocks: int, resample) -> nn.ModuleList:
    """Per level its residual blocks, then (between levels) `resample(c, next_c)`, in one list."""
    blocks: list[nn.Module] = []
    for i, c in enumerate(channels):
        blocks += [ResBlock3d(c) for _ in range(res_blocks)]
        if i < len(channels) - 1:
            blocks.append(resample(c, channels[i + 1]))
    return nn.ModuleList(blocks)


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAE64Config):
        super().__init__()
        ch = cfg.channels
        self.input_layer = nn.Conv3d(1, ch[0], 3, padding=1)
        self.blocks = _levels(ch, cfg.num_res_blocks, Downsample3d)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[-1]) for _ in range(cfg.num_res_blocks_middle)])
        self.out_layer = _out_layer(ch[-1], 2 * cfg.latent_channels)  # mean and log-variance
        self.latent_channels = cfg.latent_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.input_layer(x)
        for block in self.blocks:
            h = block(h)
        h = self.out_layer(self.middle_block(h))
        return h[:, :self.latent_channels]  # the mean; the log-variance half is never used


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAE64Config):
        super().__init__()
        ch = tuple(reversed(cfg.channels))
        self.input_layer = nn.Conv3d(cfg.latent_channels, ch[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[0]) for _ in range(cfg.num_res_blocks_middle)])
        self.blocks = _levels(ch, cfg.num_res_blocks, Upsample3d)
        self.out_layer = _out_layer(ch[-1], 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.middle_block(self.input_layer(z))
        for block in self.blocks:
            h = block(h)
        return self.out_layer(h)


class VectorQuantizer(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        # the reference's init, U(-1/K, 1/K); also skips nn.Embedding's normal_, slow on the meta device
        weight = torch.empty(num_embeddings, dim).uniform_(-1 / num_embeddings, 1 / num_embeddings)
        self.embeddings = nn.Embedding(num_embeddings, dim, _weight=weight)

    @torch.no_grad()
    def nearest(self, z: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """[N, D] -> int64[N]: the codebook row at the smallest Euclidean distance (chunked so
        N x K distances never exist at once)."""
        book = self.embeddings.weight.float()
        book_sq = (book * book).sum(1)
        out = torch.empty(len(z), dtype=torch.long, device=z.device)
        for s in range(0, len(z), chunk):
            zc = z[s:s + chunk].float()
            out[s:s + chunk] = (book_sq[None] - 2.0 * zc @ book.T).argmin(1)  # |z|^2 is constant per row
        return out


def latent_to_tokens(z: torch.Tensor) -> torch.Tensor:
    """[B, C, 16, 16, 16] latent -> [B, 1024, 4*C] token vectors (raster x, y, z-quad; dim = dz*C + c)."""
    b, c = z.shape[:2]
    return z.permute(0, 2, 3, 4, 1).reshape(b, SEQ_LEN, CELLS_PER_TOKEN * c)


def tokens_to_latent(v: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of latent_to_tokens."""
    r = LATENT_RESOLUTION
    return v.reshape(v.shape[0], r, r, r, channels).permute(0, 4, 1, 2, 3)


class VQVAE3D(nn.Module):
    """The ShapeLLM-Omni 3D VQ-VAE. Works in the authors' (Z-up) frame on [B, 1, 64, 64, 64]."""

    def __init__(self, config: VQVAE64Config | None = None):
        super().__init__()
        self.config = config or VQVAE64Config()
        self.Encoder = Encoder(self.config)
        self.Decoder = Decoder(self.config)
        self.vq = VectorQuantizer(self.config.num_embeddings, self.config.embedding_dim)

    @torch.no_grad()
    def encode_indices(self, occ: torch.Tensor) -> torch.Tensor:
        """float[B, 1, 64, 64, 64] occupancy -> int64[B, 1024] codebook ids."""
        z = latent_to_tokens(self.Encoder(occ))
        return self.vq.nearest(z.reshape(-1, z.shape[-1])).reshape(len(occ), SEQ_LEN)

    @torch.no_grad()
    def decode_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """int64[B, 1024] ids -> float[B, 1, 64, 64, 64] occupancy logits (occupied = logit > 0)."""
        v = self.vq.embeddings(ids)
        return self.Decoder(tokens_to_latent(v, self.config.latent_channels))


# ---- the codec --------------------------------------------------------------------------------

class VQVAE64Codec(VQVAE64Checkpoint):
    """A formats.codecs.Codec (its declarations inherited from the checkpoint format): grids are
    uint8[64, 64, 64] in rl3d's frame (grid[x, y, z], +Y up; 1 = occupied, no colour), token ids in
    [0, 8192), 1,024 per shape."""

    def __init__(self, model: VQVAE3D, source: str | None = None, batch_size: int = 8):
        self.model = model.eval()
        self.config = model.config
        self.vocab_size = self.config.num_embeddings
        self.source = source
        self.batch_size = batch_size  # shapes per forward pass (bounds activation memory)
        self._hash: str | None = None
        self.stats: dict = {}

    @property
    def device(self) -> torch.device:
        return self.model.vq.embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.vq.embeddings.weight.dtype

    # ---- persistence ----
    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, batch_size: int = 8) -> "VQVAE64Codec":
        """A checkpoint dir or .safetensors file; InputError naming the file when it is missing,
        unreadable (e.g. truncated) or has the wrong keys / shapes."""
        f, config, state = read_weights(path)
        with torch.device("meta"):
            model = VQVAE3D(config)
        model.load_state_dict(state, strict=True, assign=True)  # keys/shapes checked by read_weights
        model = model.to(device=device, dtype=dtype)
        return cls(model, source=str(f), batch_size=batch_size)

    @classmethod
    def open(cls, path: str | os.PathLike, device: str | None = None) -> "VQVAE64Codec":
        """The Codec interface's loader (stages/codecs `load_codec`)."""
        return cls.load(path, device=device or "cpu")

    @property
    def external(self) -> bool:
        """Referenced by path from a policy when it was loaded from (or saved to) a file."""
        return bool(self.source) and Path(self.source).is_file()

    def save(self, out: str | os.PathLike) -> Path:
        """out/3DVQVAE.safetensors + out/vqvae64.json (the config and content hash)."""
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        self._hash = None
        self.source = str(write_weights(out, state, self.config, file_hash))
        return Path(out)

    def content_hash(self) -> str:
        """Identifies the weights (sha256 of the checkpoint file, or of the tensors before a save)."""
        if self._hash is None:
            if self.source and Path(self.source).is_file():
                self._hash = file_hash(self.source)
                return self._hash
            h = hashlib.sha256(b"vqvae64:")
            for k, v in sorted(self.model.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().to("cpu", torch.float32).numpy().tobytes())
            self._hash = h.hexdigest()[:16]
        return self._hash

    # ---- tokens ----
    def encode_batch(self, grids: np.ndarray) -> np.ndarray:
        """uint8/bool[B, 64, 64, 64] (rl3d frame, > 0 = occupied) -> int32[B, 1024]."""
        grids = np.asarray(grids)
        r = self.resolution
        if grids.ndim != 4 or grids.shape[1:] != (r, r, r):
            raise ValueError(f"expected grids of shape [B, {r}, {r}, {r}], got {grids.shape}")
        out = []
        for s in range(0, len(grids), self.batch_size):
            occ = gltf_to_vq_frame(grids[s:s + self.batch_size] > 0)
            x = torch.from_numpy(np.ascontiguousarray(occ)).to(self.device, self.dtype)[:, None]
            out.append(self.model.encode_indices(x).cpu().numpy().astype(np.int32))
        return np.concatenate(out) if out else np.zeros((0, self.seq_len), np.int32)

    def encode(self, grid: np.ndarray) -> np.ndarray:
        return self.encode_batch(np.asarray(grid)[None])[0]

    def check_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return check_tokens(tokens, self.seq_len, self.vocab_size)

    def decode_logits_batch(self, tokens: np.ndarray) -> np.ndarray:
        """int[B, 1024] -> float32[B, 64, 64, 64] occupancy logits in rl3d's frame."""
        t = self.check_tokens(tokens)
        out = []
        for s in range(0, len(t), self.batch_size):
            ids = torch.from_numpy(t[s:s + self.batch_size]).to(self.device)
            logits = self.model.decode_logits(ids)[:, 0].float().cpu().numpy()
            out.append(vq_to_gltf_frame(logits))
        r = self.resolution
        return np.concatenate(out) if out else np.zeros((0, r, r, r), np.float32)

    def decode_batch(self, tokens: np.ndarray) -> np.ndarray:
        """int[B, 1024] -> uint8[B, 64, 64, 64] occupancy (1 where logit > 0), rl3d frame."""
        return (self.decode_logits_batch(tokens) > 0).astype(np.uint8)

    def decode(self, tokens) -> np.ndarray:
        return decode_one(self, tokens)

    def __repr__(self) -> str:
        return f"VQVAE64Codec({describe_config(self.config)}, source={self.source!r})"


# ---- a hand-set replica for tests (no training, deterministic) --------------------------------

@torch.no_grad()
def make_block_replica(channels: tuple[int, int, int] = (2, 2, 2)) -> VQVAE3D:
    """A VQ-VAE with the published key names whose weights are set by hand so that each latent cell
    says whether its 4^3 voxel block is more than half full; 16 codes = the 16 full/empty patterns
    of a token's 4 z-cells (code bit q = cell q). Round trips are exact for shapes made of whole
    aligned 4^3 blocks. For CI replicas of the codec (gen -> render -> reward on CPU), not a model.

    How: residual blocks are identities (conv2 = 0); channel 0 carries the occupancy and channel 1
    its complement (1 - occupancy) so the channel LayerNorms keep the sign of (occupancy - 1/2);
    the stride-2 convs average, the upsampling convs copy (nearest). Two channels per level are
    enough (the default, and the fastest); wider levels carry zeros."""
    model = VQVAE3D(VQVAE64Config(channels=channels, num_embeddings=16))
    for p in model.parameters():
        p.zero_()
    for mod in model.modules():
        if isinstance(mod, ChannelLayerNorm):
            mod.weight.fill_(1.0)
    centre = (1, 1, 1)
    enc, dec = model.Encoder, model.Decoder
    enc.input_layer.weight[(0, 0, *centre)] = 1.0
    enc.input_layer.weight[(1, 0, *centre)] = -1.0
    enc.input_layer.bias[1] = 1.0
    for block in enc.blocks:
        if isinstance(block, Downsample3d):
            block.conv.weight[0, 0] = 1 / 8
            block.conv.weight[1, 1] = 1 / 8
    for conv in (enc.out_layer[2], dec.out_layer[2]):
        conv.weight[(0, 0, *centre)] = 1.0
        conv.weight[(0, 1, *centre)] = -1.0
    dec.input_layer.weight[(0, 0, *centre)] = 1.0
    dec.input_layer.weight[(1, 0, *centre)] = -1.0
    for block in dec.blocks:
        if isinstance(block, Upsample3d):
            for o in range(8):
                block.conv.weight[(o, 0, *centre)] = 1.0
                block.conv.weight[(8 + o, 1, *centre)] = 1.0
    full = enc(torch.ones(1, 1, RESOLUTION, RESOLUTION, RESOLUTION))[0, 0, 0, 0, 0]  # latent of a full block
    book = model.vq.embeddings.weight
    for code in range(16):
        for q in range(CELLS_PER_TOKEN):
            book[code, q * model.config.latent_channels] = full if code >> q & 1 else -full
    return model.eval()


CODEC = VQVAE64Codec  # the class stages/codecs `load_codec` runs for a VQ-VAE checkpoint
