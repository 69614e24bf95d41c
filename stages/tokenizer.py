"""The embedded default policy's tokenizer: a small byte-level BPE for the text (captions, plans,
details, prompt templates) plus one special token per chat marker and per codec mesh token.

Ids, in order: the chat/control specials (<|endoftext|> = eos, <|pad|>, <|user|>, <|assistant|>,
<mesh-start>, <mesh-end>), the BPE text vocabulary, then <mesh0>..<mesh{K-1}> contiguously in
codec order, so `id(<mesh{i}>) == id(<mesh0>) + i` and mesh id arithmetic is one add.
"""
from __future__ import annotations

from typing import Iterable

from rl3d.formats.codec import MESH_END, MESH_START, mesh_token_text
from rl3d.stages.policy import ASSISTANT, USER

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
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    from rl3d.stages.policy import INSTRUCTIONS, REQUEST

    extra = [REQUEST.format(prompt=""), *(t.replace("{plan}", "") for t in INSTRUCTIONS.values())]
    for t in [*extra, *texts]:
        for marker in CONTROL_TOKENS:
            t = t.replace(marker, "\n")
        yield t


def mesh_token_offset(tokenizer) -> int:
    """Id of <mesh0>; mesh token i is this + i."""
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
