"""The embedded policy's tokenizer: single-id specials, contiguous mesh ids, loader agreement."""
import numpy as np
import pytest

from rl3d.formats.codec import MESH_END, MESH_START, VoxelCodec, mesh_token_text
from rl3d.stages.policy.sequence import build_prompt
from rl3d.stages.policy.tokenizer import (CONTROL_TOKENS, add_mesh_tokens, build_tokenizer, load_tokenizer,
                                          mesh_token_offset)

TEXTS = ["A red chair with four legs and a tall back.", "Plan: a table; flat top, 4 legs (12 units high).",
         "It's a small blue snowman with 3 balls.\nA carrot nose."] * 20


@pytest.fixture(scope="module")
def codec():
    grids = np.zeros((3, 32, 32, 32), np.uint8)
    grids[0, :8, :8, :8] = 1
    grids[1, :4, :12, :4] = 5
    grids[2, 2:30, 0:2, 2:30] = 9
    return VoxelCodec.build(grids, 4)  # K = 1 + 4 * 16 = 65


@pytest.fixture(scope="module")
def tok(codec):
    return build_tokenizer(TEXTS, codec, vocab_size=300)


def test_specials_and_mesh_tokens_are_single_contiguous_ids(tok, codec):
    for t in CONTROL_TOKENS:
        assert len(tok.encode(t, add_special_tokens=False)) == 1, t
    off = mesh_token_offset(tok)
    ids = tok.convert_tokens_to_ids([mesh_token_text(i) for i in range(codec.vocab_size)])
    assert ids == list(range(off, off + codec.vocab_size))
    assert len(tok) == off + codec.vocab_size  # mesh tokens are the last ids
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>" and tok.eos_token_id != tok.pad_token_id
    # mesh tokens written as text come back as single ids, in order
    text = MESH_START + "".join(mesh_token_text(i) for i in (0, 7, 64)) + MESH_END
    ms, me = tok.convert_tokens_to_ids([MESH_START, MESH_END])
    assert tok(text, add_special_tokens=False)["input_ids"] == [ms, off, off + 7, off + 64, me]


def test_text_round_trips_and_prompt_markers_are_single_tokens(tok):
    p = build_prompt("a red chair", "fine", plan="four legs")
    ids = tok(p, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == p
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>") and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert len(tok) - 65 <= 300  # text part is the requested BPE size at most


def test_saved_tokenizer_loads_identically_with_auto_tokenizer(tok, codec, tmp_path):
    # a Qwen2 config beside the tokenizer makes AutoTokenizer rebuild it as Qwen2Tokenizer: it must agree
    from transformers import AutoTokenizer

    from rl3d.stages.supervised.model import build_model

    build_model("tiny", len(tok), tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    auto, ours = AutoTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(tmp_path)
    for s in [build_prompt("It's a 3D chair's back", "coarse"), "  odd   spacing ÄÖ 42x\n\nend",
              MESH_START + mesh_token_text(3) + MESH_END + "<|endoftext|>"]:
        want = tok(s, add_special_tokens=False)["input_ids"]
        assert auto(s, add_special_tokens=False)["input_ids"] == want
        assert ours(s, add_special_tokens=False)["input_ids"] == want
    assert auto.pad_token_id == tok.pad_token_id and auto.eos_token_id == tok.eos_token_id


def test_add_mesh_tokens_to_a_tokenizer_without_them(codec):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.add_special_tokens(["<eos>"])
    t = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>")
    assert add_mesh_tokens(t, codec.vocab_size) == codec.vocab_size + 2
    off = mesh_token_offset(t)
    assert t.convert_tokens_to_ids(mesh_token_text(codec.vocab_size - 1)) == off + codec.vocab_size - 1
    assert t.pad_token == "<eos>"
    assert add_mesh_tokens(t, codec.vocab_size) == 0  # idempotent
