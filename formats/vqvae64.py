"""The ShapeLLM-Omni 3D token codec: 1,024 tokens <-> a 64^3 occupancy grid through its 3D VQ-VAE.

The network is the TRELLIS sparse-structure conv encoder/decoder with a vector quantiser between
them (ShapeLLM-Omni's `VQVAE3D`, also vendored by 3DGen-R1). This is our own torch implementation;
its parameter names and shapes match the published checkpoint, so the converted file loads with
`load_state_dict(strict=True)` (docs/codec.md lists the keys).

Shapes (published config, `VQVAE64Config()`):
    occupancy [B, 1, 64, 64, 64]
      -> Encoder (channels 32 -> 128 -> 512, two stride-2 convs) -> [B, 16, 16, 16] mean latent
         (the first 8 of the out layer's 16 channels; the other 8 are an unused log-variance)
      -> latent cells [B, 16, 16, 16, 8] (x, y, z, channel)
      -> tokens: each token is 4 consecutive z cells x 8 channels = 32 dims, in raster order
         token t = x * 64 + y * 4 + z // 4, dim = (z % 4) * 8 + channel
      -> nearest entry (Euclidean) of the 8192 x 32 codebook -> 1,024 ids
    decode: ids -> codebook rows -> [B, 8, 16, 16, 16] -> Decoder (512 -> 128 -> 32)
      -> logits [B, 1, 64, 64, 64]; occupied = logit > 0.

Frames. The network works in the authors' frame: TRELLIS's Z-up unit cube, input axes (x, y, z).
`VQVAE64Codec` takes and returns grids in rl3d's frame (formats/voxels.py: grid[x, y, z], glTF
Y-up) and turns them with `formats.occupancy` (+90 degrees about x going in, -90 coming out).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rl3d.formats.codec import MESH_END, MESH_START, CodecError, check_tokens, decode_one, mesh_token_text  # noqa: F401 (re-exported)
from rl3d.formats.errors import InputError
from rl3d.formats.occupancy import RESOLUTION, gltf_to_vq_frame, vq_to_gltf_frame
from rl3d.formats.shards import atomic_path, atomic_write_json

CHECKPOINT_FILE = "3DVQVAE.safetensors"  # the published 3DVQVAE.bin, converted (convert_bin_checkpoint)
CONFIG_FILE = "vqvae64.json"             # optional beside it: a non-published config (test replicas)
LATENT_RESOLUTION = 16                   # 64^3 voxels -> 16^3 latent cells (two stride-2 convs)
CELLS_PER_TOKEN = 4                      # consecutive z cells per token
SEQ_LEN = LATENT_RESOLUTION ** 3 // CELLS_PER_TOKEN  # 1024


@dataclass(frozen=True)
class VQVAE64Config:
    """Sizes of the VQ-VAE. The default is the published ShapeLLM-Omni checkpoint; tests build it at
    reduced channels / codebook with the same parameter names."""
    channels: tuple[int, ...] = (32, 128, 512)  # encoder widths; the decoder runs them reversed
    latent_channels: int = 8
    num_embeddings: int = 8192
    num_res_blocks: int = 2
    num_res_blocks_middle: int = 2

    def __post_init__(self):
        if len(self.channels) != 3:  # two downsamples: 64^3 -> 16^3, fixed by the token layout
            raise ValueError(f"channels must have 3 entries (64^3 -> 16^3 latent), got {self.channels}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))

    @property
    def embedding_dim(self) -> int:
        return self.latent_channels * CELLS_PER_TOKEN

    @classmethod
    def from_dict(cls, d: dict) -> "VQVAE64Config":
        known = {k: d[k] for k in ("channels", "latent_channels", "num_embeddings", "num_res_blocks",
                                   "num_res_blocks_middle") if k in d}
        return cls(**known)


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


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAE64Config):
        super().__init__()
        ch = cfg.channels
        self.input_layer = nn.Conv3d(1, ch[0], 3, padding=1)
        blocks = []
        for i, c in enumerate(ch):
            blocks += [ResBlock3d(c) for _ in range(cfg.num_res_blocks)]
            if i < len(ch) - 1:
                blocks.append(Downsample3d(c, ch[i + 1]))
        self.blocks = nn.ModuleList(blocks)
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
        blocks = []
        for i, c in enumerate(ch):
            blocks += [ResBlock3d(c) for _ in range(cfg.num_res_blocks)]
            if i < len(ch) - 1:
                blocks.append(Upsample3d(c, ch[i + 1]))
        self.blocks = nn.ModuleList(blocks)
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


# ---- checkpoint contract ----------------------------------------------------------------------

def expected_shapes(config: VQVAE64Config | None = None) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a checkpoint of this config, in state-dict order."""
    return dict(_expected_shapes(config or VQVAE64Config()))


@functools.lru_cache(maxsize=8)
def _expected_shapes(config: VQVAE64Config) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):  # nothing is allocated
        model = VQVAE3D(config)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def key_table_markdown(config: VQVAE64Config | None = None) -> str:
    """The documented key table (docs/codec.md): one row per tensor, in state-dict order."""
    rows = [f"| `{k}` | {' x '.join(map(str, s))} |" for k, s in expected_shapes(config).items()]
    return "\n".join(["| key | shape |", "|---|---|", *rows])


def _short(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def check_shapes(found: dict[str, tuple[int, ...]], config: VQVAE64Config, source: str) -> None:
    """InputError (one line naming `source`) unless `found` has exactly the expected keys and shapes."""
    want = expected_shapes(config)
    what = f"not a ShapeLLM-Omni 3D VQ-VAE checkpoint for {_describe(config)}"
    missing, extra = want.keys() - found.keys(), found.keys() - want.keys()
    if missing or extra:
        parts = ([f"missing {len(missing)} key(s): {_short(missing)}"] if missing else []) + \
                ([f"unexpected {len(extra)} key(s): {_short(extra)}"] if extra else [])
        raise InputError(f"{source}: {what}: " + "; ".join(parts))
    bad = sorted(k for k in want if tuple(found[k]) != want[k])
    if bad:
        k = bad[0]
        raise InputError(f"{source}: {what}: {len(bad)} tensor(s) of the wrong shape, e.g. {k} is "
                         f"{list(found[k])}, expected {list(want[k])}")


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())


def _describe(config: VQVAE64Config) -> str:
    return f"channels {list(config.channels)}, codebook {config.num_embeddings}x{config.embedding_dim}"


def read_header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (no weights read); InputError when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise InputError(f"{file}: not a readable safetensors file ({_one_line(e)})") from None


def resolve_checkpoint(path: str | os.PathLike) -> tuple[Path, VQVAE64Config]:
    """A checkpoint dir (holding 3DVQVAE.safetensors, optionally vqvae64.json) or the .safetensors
    file itself -> (file, config). InputError naming the file when it is missing."""
    if path is None:
        raise InputError(f"no VQ-VAE checkpoint given: point rl3d at a directory holding {CHECKPOINT_FILE} "
                         f"(see docs/codec.md)")
    p = Path(path)
    f = p / CHECKPOINT_FILE if p.is_dir() else p
    if f.suffix == ".bin":
        raise InputError(f"{f}: a pickled checkpoint; convert it to safetensors first: "
                         f"rl3d codec convert {f} {f.parent}")
    if not f.is_file():
        raise InputError(f"{f}: VQ-VAE checkpoint not found (expected the published 3DVQVAE.bin converted to "
                         f"{CHECKPOINT_FILE}; see docs/codec.md)")
    cfg_file = f.with_name(CONFIG_FILE)
    config = VQVAE64Config()
    if cfg_file.is_file():
        try:
            config = VQVAE64Config.from_dict(json.loads(cfg_file.read_text()))
        except (ValueError, TypeError) as e:
            raise InputError(f"{cfg_file}: not a VQ-VAE config ({e})") from None
    return f, config


def check_checkpoint(path: str | os.PathLike) -> tuple[Path, VQVAE64Config]:
    """Header-only check of a checkpoint (keys and shapes); InputError naming the file on any problem."""
    f, config = resolve_checkpoint(path)
    check_shapes(read_header_shapes(f), config, str(f))
    return f, config


def file_hash(path: str | os.PathLike) -> str:
    """A checkpoint file's content hash, as VQVAE64Codec.content_hash gives it and rl3d_policy.json's
    codec_hash records it, without building the model (reads the whole file)."""
    h = hashlib.sha256(b"vqvae64:")
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def convert_bin_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """The published 3DVQVAE.bin (a torch pickle) -> safetensors, checked against the key table.
    torch.load runs with weights_only=True: no code from the file is executed."""
    from safetensors.torch import save_file

    state = torch.load(str(src), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{src}: expected a state dict of tensors (name -> tensor), got {type(state).__name__}")
    check_shapes({k: tuple(v.shape) for k, v in state.items()}, VQVAE64Config(), str(src))
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst))
    return Path(dst)


# ---- the codec --------------------------------------------------------------------------------

class VQVAE64Codec:
    """Same interface as formats.codec.VoxelCodec: grids are uint8[64, 64, 64] in rl3d's frame
    (grid[x, y, z], +Y up; 1 = occupied, no colour), token ids in [0, 8192), 1,024 per shape."""
    resolution = RESOLUTION
    seq_len = SEQ_LEN

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
        from safetensors.torch import load_file

        f, config = check_checkpoint(path)
        try:
            state = load_file(str(f))
        except Exception as e:
            raise InputError(f"{f}: not a readable safetensors file ({_one_line(e)})") from None
        with torch.device("meta"):
            model = VQVAE3D(config)
        model.load_state_dict(state, strict=True, assign=True)  # keys/shapes checked above
        model = model.to(device=device, dtype=dtype)
        return cls(model, source=str(f), batch_size=batch_size)

    def save(self, out: str | os.PathLike) -> Path:
        """out/3DVQVAE.safetensors + out/vqvae64.json (the config and content hash)."""
        from safetensors.torch import save_file


        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        with atomic_path(out / CHECKPOINT_FILE) as tmp:
            save_file(state, str(tmp))
        self.source, self._hash = str(out / CHECKPOINT_FILE), None
        atomic_write_json(out / CONFIG_FILE, {**asdict(self.config), "vocab_size": self.vocab_size,
                                              "seq_len": self.seq_len, "content_hash": self.content_hash()})
        return out

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
        return f"VQVAE64Codec({_describe(self.config)}, source={self.source!r})"


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
