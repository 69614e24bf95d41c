"""The policy's tokenizer: loading one from a policy dir, giving a pretrained one the mesh tokens,
finding in it the special ids the sequence layout and the sampler need (special_ids -> SpecialIds,
which sequence.py defines with the layout's constraint table), and the embedded default
policy's own tokenizer: a small byte-level BPE for the text (captions, plans, details, prompt
templates) plus one special token per chat marker and per codec mesh token.

Ids, in order: the chat/control specials (<|endoftext|> = eos, <|pad|>, <|user|>, <|assistant|>,
<mesh-start>, <mesh-end>), the BPE text vocabulary, then <mesh0>..<mesh{K-1}> contiguously in
codec order. Other tokenizers (real checkpoints) need not have contiguous mesh ids: callers map
codec ids through SpecialIds.mesh_ids, never by adding an offset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rl3d.formats.codec import MESH_END, MESH_START, mesh_token_text
from rl3d.formats.errors import InputError
from rl3d.formats.model_dirs import remote_code_allowed
from rl3d.stages.policy.sequence import ASSISTANT, INSTRUCTIONS, REQUEST, USER, SpecialIds  # noqa: F401 (re-exported)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CONTROL_TOKENS = (EOS, PAD, USER, ASSISTANT, MESH_START, MESH_END)
# transformers' Qwen2Tokenizer pre-tokenisation regex
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def build_tokenizer(texts: list[str], codec, vocab_size: int = 1024):
    """Train a byte-level BPE on `texts` (plus the prompt templates) and add the special tokens.

    `vocab_size` is the size of the text part (control tokens + bytes + merges); the codec's
    `codec.vocab_size` mesh tokens come on top. Returns a transformers PreTrainedTokenizerFast.
    """
    # Qwen2's pipeline exactly (NFC, its split regex, byte-level): the saved dir sits beside a
    # Qwen2 config, so AutoTokenizer rebuilds it as a Qwen2Tokenizer, which must tokenise the same.
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(CONTROL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_texts(texts), trainer=trainer)
    base = tok.get_vocab_size(with_added_tokens=True)
    # added after training, in codec order: contiguous ids base .. base + K - 1
    tok.add_special_tokens([mesh_token_text(i) for i in range(codec.vocab_size)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                      padding_side="right", model_max_length=1 << 20)
    check_tokenizer(wrapped, codec.vocab_size)
    assert wrapped.convert_tokens_to_ids(mesh_token_text(0)) == base
    return wrapped


def _training_texts(texts: Iterable[str]) -> Iterable[str]:
    """The corpus with the control markers removed (they are whole tokens, not text to merge),
    plus the instruction templates the policy is always prompted with."""
    extra = [REQUEST.format(prompt=""), *(t.replace("{plan}", "") for t in INSTRUCTIONS.values())]
    for t in [*extra, *texts]:
        for marker in CONTROL_TOKENS:
            t = t.replace(marker, "\n")
        yield t


def mesh_token_offset(tokenizer) -> int:
    """Id of <mesh0> (recorded in rl3d_policy.json; for rl3d's own tokenizers mesh token i is this + i)."""
    return tokenizer.convert_tokens_to_ids(mesh_token_text(0))


def check_tokenizer(tokenizer, n_mesh: int, control: tuple[str, ...] = CONTROL_TOKENS) -> None:
    """Every control and mesh token is one id, and the mesh ids are contiguous (ValueError if not)."""
    for t in control:
        if len(tokenizer.encode(t, add_special_tokens=False)) != 1:
            raise ValueError(f"tokenizer: {t!r} is not a single token")
    vocab = tokenizer.get_vocab()
    ids = [vocab.get(mesh_token_text(i)) for i in range(n_mesh)]
    if None in ids or ids != list(range(ids[0], ids[0] + n_mesh)):
        raise ValueError(f"tokenizer: mesh tokens <mesh0>..<mesh{n_mesh - 1}> are missing or not contiguous")


def add_mesh_tokens(tokenizer, n_mesh: int) -> int:
    """Give an existing (e.g. pretrained) tokenizer the mesh tokens it lacks; returns how many were
    added. Tokens are added in codec order so fresh ones get contiguous ids."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (MESH_START, MESH_END) if t not in vocab]
    if mesh_token_text(0) not in vocab:
        missing += [mesh_token_text(i) for i in range(n_mesh)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_tokenizer(tokenizer, n_mesh, control=(MESH_START, MESH_END))
    return len(missing)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a policy dir. A plain `tokenizers` tokenizer (rl3d's own, saved as
    TokenizersBackend / PreTrainedTokenizerFast) is loaded as such: AutoTokenizer would pick the
    tokenizer class of config.json's model type (e.g. Qwen2Tokenizer) and rebuild it wrongly."""
    path = Path(path)
    cfg_file = path / "tokenizer_config.json"
    try:
        cls_name = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
        generic = cls_name in ("TokenizersBackend", "PreTrainedTokenizerFast")
        cls = PreTrainedTokenizerFast if generic else AutoTokenizer
        return cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=remote_code_allowed())
    except Exception as e:
        raise InputError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None


# keyword arguments of from_pretrained that say how a tokenizer was loaded, not what it is: transformers
# keeps them in init_kwargs and save_pretrained writes them to tokenizer_config.json, so a tokenizer
# loaded back (sft's resume) would save other bytes than the one it was saved from
LOADER_ONLY_KEYS = ("is_local", "local_files_only", "trust_remote_code", "cache_dir", "force_download",
                    "revision", "token", "proxies", "subfolder", "_from_auto", "_commit_hash")


def strip_loader_keys(tokenizer) -> list[str]:
    """Drop the loader-only keys from what `tokenizer.save_pretrained` writes; returns those dropped."""
    kwargs = getattr(tokenizer, "init_kwargs", None)
    if not isinstance(kwargs, dict):
        return []
    return [k for k in LOADER_ONLY_KEYS if kwargs.pop(k, None) is not None]


# ---- special ids ---------------------------------------------------------------------------------

def mesh_token_ids(tokenizer, codec, source: str = "tokenizer") -> tuple[torch.Tensor, int, int, int]:
    """-> (int64[K] ids of <mesh0>..<mesh{K-1}> in codec order, id of <mesh-start>, of <mesh-end>, of eos).
    Ids are looked up by name: a real checkpoint's (e.g. ShapeLLM-Omni's 151665..159858) need not
    be contiguous or follow any offset. InputError naming every missing token (as ranges)."""
    vocab = tokenizer.get_vocab()
    names = [mesh_token_text(i) for i in range(codec.vocab_size)]
    missing = [n for n in (MESH_START, MESH_END) if n not in vocab]
    missing_codes = [i for i, n in enumerate(names) if n not in vocab]
    if missing or missing_codes:
        what = missing + [f"<mesh{a}>" if a == b else f"<mesh{a}>..<mesh{b}>" for a, b in _runs(missing_codes)]
        shown = ", ".join(what[:6]) + (f" and {len(what) - 6} more ranges" if len(what) > 6 else "")
        raise InputError(f"{source}: tokenizer lacks {len(missing) + len(missing_codes)} of the codec's mesh tokens: "
                         f"{shown} (the codec needs {MESH_START}, {MESH_END} and <mesh0>..<mesh{codec.vocab_size - 1}>)")
    if tokenizer.eos_token_id is None:
        raise InputError(f"{source}: tokenizer has no eos token")
    ids = torch.tensor([vocab[n] for n in names], dtype=torch.long)
    return ids, vocab[MESH_START], vocab[MESH_END], int(tokenizer.eos_token_id)


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Sorted ints -> (first, last) of each run of consecutive values."""
    out: list[tuple[int, int]] = []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def describe_mesh_ids(special: "SpecialIds") -> dict:
    """What gen records about the tokenizer's mesh ids: the id ranges of <mesh0>.. in codec order,
    and of <mesh-start> / <mesh-end> (e.g. ShapeLLM-Omni: [[151665, 159856]], 159857, 159858)."""
    ids = special.mesh_ids.tolist()
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            runs.append([ids[start], ids[i - 1]])
            start = i
    return {"mesh_code_ids": runs, "mesh_start_id": special.mesh_start, "mesh_end_id": special.mesh_end}


def special_ids(tokenizer, codec, vocab_size: int | None = None, source: str = "tokenizer") -> SpecialIds:
    mesh, start, end, eos = mesh_token_ids(tokenizer, codec, source)
    v = int(vocab_size or len(tokenizer))
    if max(int(mesh.max()), start, end, eos) >= v:
        raise InputError(f"{source}: tokenizer ids exceed the model's {v} output rows")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    # text = every real tokenizer id that is not a special/added control token
    text = torch.zeros(v, dtype=torch.bool)
    text[: min(len(tokenizer), v)] = True
    banned = set(tokenizer.all_special_ids) | {start, end, eos, pad}
    banned |= {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    text[torch.tensor(sorted(i for i in banned if i < v), dtype=torch.long)] = False
    text[mesh] = False
    return SpecialIds(mesh, int(start), int(end), int(eos), int(pad), text.nonzero()[:, 0], v)
