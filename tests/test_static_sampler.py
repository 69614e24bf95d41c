"""The fixed-shape sampler (stages/policy/static_sampler.py) against the plain sampler on CPU: the
same tokens and log-probs for a fixed seed, the same top-k / top-p acceptance, the same row layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_tiny_policy

from rl3d.stages.policy.checkpoint import load_policy
from rl3d.stages.policy.sampler import Sampling, sample_sequences, sample_tokens
from rl3d.stages.policy.sequence import build_prompt, encode_text
from rl3d.stages.policy.attention import decode_sdpa, install_decode_attention, kv_limit
from rl3d.stages.policy.static_sampler import cache_read, keep_threshold, sample_sequences_static, sample_tokens_fixed

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_policy(make_tiny_policy(tmp_path_factory.mktemp("pol") / "policy"), device="cpu", dtype="float32")


def _random_logits(B: int, V: int, seed: int, n_forbidden: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 3
    if n_forbidden:
        x[:, -n_forbidden:] = -float("inf")
    return x


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (0, 0.9), (0, 0.5), (5, 1.0), (40, 0.8), (1, 1.0), (0, 0.02)])
def test_fixed_shape_draws_equal_the_rejection_loop(top_k, top_p):
    masked = _random_logits(64, 300, seed=top_k + int(top_p * 100), n_forbidden=37)
    seeds = torch.arange(64) * 7919
    for step in (0, 5):
        want_tok, want_lp = sample_tokens(masked, seeds, step, top_k, top_p)
        tok, lp = sample_tokens_fixed(masked, seeds, torch.tensor(step), top_k, top_p, torch.arange(64))
        assert tok.tolist() == want_tok.tolist()
        assert torch.equal(lp, want_lp)


def test_keep_threshold_is_the_smallest_kept_weight():
    w = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25, 0.0, 0.0]])
    total = w.sum(-1)
    assert keep_threshold(w, total, 0, 1.0, 6).tolist() == [0.0, 0.0]  # no cut
    assert keep_threshold(w, total, 0, 0.7, 6).tolist() == pytest.approx([0.3, 0.25])  # ties are all kept
    assert keep_threshold(w, total, 0, 0.5, 6).tolist() == pytest.approx([0.5, 0.25])
    assert keep_threshold(w, total, 2, 1.0, 6).tolist() == pytest.approx([0.3, 0.25])
    assert keep_threshold(w, total, 3, 0.6, 6).tolist() == pytest.approx([0.3, 0.25])


@pytest.mark.parametrize("sampling", [Sampling(max_reasoning_tokens=6), Sampling(max_reasoning_tokens=4, top_p=1.0),
                                      Sampling(max_reasoning_tokens=5, temperature=0.7, top_p=0.7, top_k=8)])
def test_static_sampler_equals_the_plain_sampler(loaded, sampling):
    texts = [build_prompt(p, "coarse") for p in ("a red chair", "a tall blue table with four legs")]
    texts += [build_prompt(p, "fine", plan="red seat four legs") for p in ("a red chair", "a tall blue table")]
    prompt_ids = [encode_text(loaded.tokenizer, t) for t in texts] * 2
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    M = loaded.codec.seq_len
    want = sample_sequences(loaded.model, loaded.special, prompt_ids, seeds, M, sampling)
    got = sample_sequences_static(loaded.model, loaded.special, prompt_ids, seeds, M, sampling, sync_every=3,
                                  kv_block=4)  # the cache read in blocks of 4 positions, up to the full length
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a["tokens"] == b["tokens"]
        assert a["n_reasoning"] == b["n_reasoning"] and a["truncated"] == b["truncated"]
        assert a["logprobs"].dtype == np.float32
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5)
        assert len(a["tokens"]) == a["n_reasoning"] + 1 + M + 2


def test_static_sampler_rows_do_not_depend_on_the_batch(loaded):
    sampling = Sampling(max_reasoning_tokens=6)
    prompt_ids = [encode_text(loaded.tokenizer, build_prompt(p, "coarse")) for p in ("a red chair", "a green box")]
    both = sample_sequences_static(loaded.model, loaded.special, prompt_ids, [3, 4], loaded.codec.seq_len, sampling)
    one = sample_sequences_static(loaded.model, loaded.special, prompt_ids[1:], [4], loaded.codec.seq_len, sampling)
    assert one[0]["tokens"] == both[1]["tokens"]


def test_cuda_graph_needs_cuda(loaded):
    prompt_ids = [encode_text(loaded.tokenizer, build_prompt("a red chair", "coarse"))]
    with pytest.raises((RuntimeError, AssertionError)):
        sample_sequences_static(loaded.model, loaded.special, prompt_ids, [1], loaded.codec.seq_len,
                                Sampling(max_reasoning_tokens=2), cuda_graph=True)


def test_gen_sampler_option_gives_the_same_samples(tmp_path):
    import json

    from click.testing import CliRunner

    from rl3d.cli.main import main
    from rl3d.formats import tables

    policy = make_tiny_policy(tmp_path / "policy")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "p1", "prompt": "a red chair"}) + "\n")
    outs = {}
    for name in ("plain", "static"):
        res = CliRunner().invoke(main, ["gen", "--prompts", str(prompts), "--policy", str(policy), "-G", "2",
                                        "--max-reasoning-tokens", "4", "--sampler", name, "--seed", "3",
                                        "--out", str(tmp_path / name), "--quiet"])
        assert res.exit_code == 0, res.output
        outs[name] = tables.read_table(tmp_path / name, "samples").to_pylist()
        assert tables.table_config(tmp_path / name)["sampler"] == name
    for a, b in zip(outs["plain"], outs["static"]):
        assert a["input_ids"] == b["input_ids"] and a["sample_id"] == b["sample_id"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5)
    res = CliRunner().invoke(main, ["gen", "--prompts", str(prompts), "--sampler", "fast", "--out",
                                    str(tmp_path / "x")])
    assert res.exit_code == 2 and "fast" in res.output


def test_decode_attention_equals_transformers_sdpa():
    """One query token per row, 4 query heads over 2 key/value heads, left padding and a cache not
    yet written past position 9: the packed heads and the read cut to 12 positions give
    transformers' values (which copy each key/value head per query head and read all 20)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    install_decode_attention()
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, S, D = 3, 4, 2, 20, 8
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, 1), (Hkv, S), (Hkv, S)))
    k[:, :, 10:] = 0  # not written yet, as in a static cache
    v[:, :, 10:] = 0
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    mask[:, :, :, :10] = True
    mask[1, :, :, :3] = False  # row 1 left-padded by 3
    module = torch.nn.Module()
    module.num_key_value_groups = H // Hkv
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=D ** -0.5)
    for limit in (None, 12, 10, S):
        with kv_limit(limit):
            got, _ = decode_sdpa(module, q, k, v, mask, scaling=D ** -0.5)
        assert got.shape == (B, 1, H, D)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # more than one query token (prefill, training) is transformers' own path, whole
    q2 = torch.randn(B, H, 5, D, generator=g)
    mask2 = torch.ones(B, 1, 5, S, dtype=torch.bool)
    with kv_limit(8):
        got2, _ = decode_sdpa(module, q2, k, v, mask2)
    torch.testing.assert_close(got2, sdpa_attention_forward(module, q2, k, v, mask2)[0])


def test_cache_read_covers_every_written_position():
    assert [cache_read(5, t, 40, block=8) for t in (0, 2, 3, 10, 34)] == [8, 8, 16, 16, 40]
    for t in range(35):
        assert 5 + t + 1 <= cache_read(5, t, 40, block=8) <= 40
