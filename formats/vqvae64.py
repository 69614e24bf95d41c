"""The ShapeLLM-Omni 3D token codec on disk: its checkpoint file (3DVQVAE.safetensors, optionally
vqvae64.json beside it), the tensor names and shapes that file must hold, its content hash, and the
conversion of the published 3DVQVAE.bin. The network that runs the checkpoint is torch code and
lives above this layer (stages/codecs/vqvae64.py); nothing here imports torch at import time, so a
header check (doctor, `rl3d codec hash`, gen's length check) never loads it.

The network is the TRELLIS sparse-structure conv encoder/decoder with a vector quantiser between
them (ShapeLLM-Omni's `VQVAE3D`, also vendored by 3DGen-R1); `expected_shapes` spells out its
parameters in state-dict order (docs/codec.md lists the keys; tests check the torch module against it).

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
The codec (stages/codecs/vqvae64.py `VQVAE64Codec`) takes and returns grids in rl3d's frame (formats/voxels.py: grid[x, y, z], glTF
Y-up) and turns them with `formats.occupancy` (+90 degrees about x going in, -90 coming out).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from rl3d.formats.errors import InputError
from rl3d.formats.occupancy import RESOLUTION
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


# ---- checkpoint contract ----------------------------------------------------------------------

def expected_shapes(config: VQVAE64Config | None = None) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a checkpoint of this config, in state-dict order."""
    return dict(_expected_shapes(config or VQVAE64Config()))


def _conv(name: str, cout: int, cin: int, k: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.weight", (cout, cin, k, k, k)), (f"{name}.bias", (cout,))]


def _norm(name: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{name}.weight", (c,)), (f"{name}.bias", (c,))]


def _res_block(name: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    # registration order of the network's residual block: norm1, norm2, conv1, conv2
    return [*_norm(f"{name}.norm1", c), *_norm(f"{name}.norm2", c),
            *_conv(f"{name}.conv1", c, c, 3), *_conv(f"{name}.conv2", c, c, 3)]


def _levels(prefix: str, channels: tuple[int, ...], res_blocks: int, resample) -> list:
    """`prefix`.blocks: per level its residual blocks, then (between levels) `resample(name, c, next_c)`,
    numbered in one sequence as the module's ModuleList numbers them."""
    out, i = [], 0
    for level, c in enumerate(channels):
        for _ in range(res_blocks):
            out += _res_block(f"{prefix}.blocks.{i}", c)
            i += 1
        if level < len(channels) - 1:
            out += resample(f"{prefix}.blocks.{i}.conv", c, channels[level + 1])
            i += 1
    return out


@functools.lru_cache(maxsize=8)
def _expected_shapes(config: VQVAE64Config) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The checkpoint's tensors, spelled out from the config (the file contract, without building
    the torch module; tests/test_vqvae64.py checks it against the module's state dict)."""
    ch, lat = config.channels, config.latent_channels
    rev = tuple(reversed(ch))
    out = _conv("Encoder.input_layer", ch[0], 1, 3)
    # downsample: a stride-2 conv
    out += _levels("Encoder", ch, config.num_res_blocks, lambda name, c, nxt: _conv(name, nxt, c, 2))
    out += [kv for j in range(config.num_res_blocks_middle) for kv in _res_block(f"Encoder.middle_block.{j}", ch[-1])]
    out += _norm("Encoder.out_layer.0", ch[-1]) + _conv("Encoder.out_layer.2", 2 * lat, ch[-1], 3)
    out += _conv("Decoder.input_layer", rev[0], lat, 3)
    out += [kv for j in range(config.num_res_blocks_middle) for kv in _res_block(f"Decoder.middle_block.{j}", rev[0])]
    # upsample: conv to 8x the channels, then a 3D pixel shuffle
    out += _levels("Decoder", rev, config.num_res_blocks, lambda name, c, nxt: _conv(name, nxt * 8, c, 3))
    out += _norm("Decoder.out_layer.0", rev[-1]) + _conv("Decoder.out_layer.2", 1, rev[-1], 3)
    out.append(("vq.embeddings.weight", (config.num_embeddings, config.embedding_dim)))
    return tuple(out)


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
    what = f"not a ShapeLLM-Omni 3D VQ-VAE checkpoint for {describe_config(config)}"
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


def describe_config(config: VQVAE64Config) -> str:
    """Its sizes in a message: channels and codebook."""
    return f"channels {list(config.channels)}, codebook {config.num_embeddings}x{config.embedding_dim}"


def read_header_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (no weights read); InputError when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:  # header only: no torch
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
    import torch  # a pickle of torch tensors: only this conversion needs torch
    from safetensors.torch import save_file

    state = torch.load(str(src), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{src}: expected a state dict of tensors (name -> tensor), got {type(state).__name__}")
    check_shapes({k: tuple(v.shape) for k, v in state.items()}, VQVAE64Config(), str(src))
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst))
    return Path(dst)




def read_weights(path: str | os.PathLike) -> tuple[Path, VQVAE64Config, dict]:
    """A checkpoint's (file, config, name -> torch tensor), its keys and shapes checked by header
    first; InputError naming the file when it is missing, unreadable (e.g. truncated) or wrong."""
    from safetensors.torch import load_file  # torch: only a caller that builds the network reads weights

    f, config = check_checkpoint(path)
    try:
        state = load_file(str(f))
    except Exception as e:
        raise InputError(f"{f}: not a readable safetensors file ({_one_line(e)})") from None
    return f, config, state


def write_weights(out: str | os.PathLike, state: dict, config: VQVAE64Config, content_hash) -> Path:
    """out/3DVQVAE.safetensors (the tensors, written atomically) + out/vqvae64.json (the config,
    vocab_size, seq_len and the hash `content_hash(file)` gives the written file). Returns the file."""
    from safetensors.torch import save_file  # the tensors are torch's: the caller has torch loaded

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / CHECKPOINT_FILE
    with atomic_path(f) as tmp:
        save_file(state, str(tmp))
    atomic_write_json(out / CONFIG_FILE, {**asdict(config), "vocab_size": config.num_embeddings,
                                          "seq_len": SEQ_LEN, "content_hash": content_hash(f)})
    return f


# ---- the format (formats/codecs.py) ---------------------------------------------------------------

class VQVAE64Checkpoint:
    """ShapeLLM-Omni's 64^3 VQ-VAE as a formats.codecs.CodecFormat: 1,024 tokens per shape over
    occupancy-only 64^3 grids. Its codec class (the network) is stages/codecs/vqvae64.py's CODEC,
    which inherits these declarations."""
    kind = "vqvae64"
    resolution = RESOLUTION
    seq_len = SEQ_LEN
    coloured = False  # occupancy only: gen writes neutral meshes
    network = True
    external = True   # 533 MB published: a policy references the file by path (gen records it for reward)

    @classmethod
    def recognises(cls, path: str | os.PathLike | None) -> bool:
        """A .safetensors / .bin file or a dir holding 3DVQVAE.safetensors (a .bin is recognised so
        that it gets the "convert it first" error)."""
        if path is None:
            return False
        p = Path(path)
        return p.suffix in (".safetensors", ".bin") or (p.is_dir() and (p / CHECKPOINT_FILE).is_file())

    @classmethod
    def seq_len_at(cls, path: str | os.PathLike | None) -> int:
        return cls.seq_len  # fixed by the token layout: no read

    @classmethod
    def header(cls, path: str | os.PathLike | None) -> dict:
        f, config = check_checkpoint(path)
        return {"kind": cls.kind, "vocab_size": config.num_embeddings, "content_hash": file_hash(f)}
