"""Policy loading, the constraint masks and log-prob recomputation, on a tiny random Qwen2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import WORDS, make_tiny_policy

from rl3d.formats.errors import InputError
from rl3d.stages.policy.checkpoint import POLICY_META, load_policy
from rl3d.stages.policy.sampler import completion_logprobs
from rl3d.stages.policy.sequence import (KIND_FORCE_END, KIND_FORCE_EOS, KIND_FORCE_START, KIND_MESH,
                                         KIND_REASONING, allowed_mask, build_prompt, build_sequence, collate)
from rl3d.stages.policy.tokenizer import mesh_token_ids

torch.set_num_threads(1)  # tiny models: intra-op threads only add contention on a shared machine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_policy(tmp_path_factory.mktemp("pol") / "policy")
    return load_policy(d, device="cpu", dtype="float32")


def test_load_policy_roundtrip(tiny):
    assert tiny.step == 3 and tiny.meta["base"] == "random-init"
    path, rest = tiny.policy_id.split("@")
    assert Path(path) == tiny.path and path.startswith("/")
    assert rest.endswith("#step3") and len(rest.split("#")[0]) == 12
    assert tiny.model.dtype == torch.float32 and not tiny.model.training
    assert (tiny.path / "codec" / "codebook.npz").is_file()
    assert json.loads((tiny.path / POLICY_META).read_text())["model_class"] == "Qwen2ForCausalLM"
    # mesh ids in codec order
    ids, start, end, eos = mesh_token_ids(tiny.tokenizer, tiny.codec)
    assert ids.tolist() == [tiny.tokenizer.convert_tokens_to_ids(f"<mesh{i}>") for i in range(33)]
    assert (start, end, eos) == (tiny.special.mesh_start, tiny.special.mesh_end, tiny.special.eos)
    assert tiny.special.vocab_size == len(tiny.tokenizer) + 3


def test_load_policy_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_policy(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no config.json"):
        load_policy(tmp_path / "empty")


def test_allowed_mask(tiny):
    sp = tiny.special
    m = allowed_mask(sp)
    words = [tiny.tokenizer.convert_tokens_to_ids(w) for w in WORDS]
    r = m[KIND_REASONING]
    assert r[words].all() and r[sp.mesh_start]
    assert not r[sp.mesh_ids].any() and not r[[sp.mesh_end, sp.eos, sp.pad]].any()
    assert not r[len(tiny.tokenizer):].any()  # spare output rows are never text
    assert m[KIND_MESH].nonzero()[:, 0].tolist() == sorted(sp.mesh_ids.tolist())
    for k, t in [(KIND_FORCE_START, sp.mesh_start), (KIND_FORCE_END, sp.mesh_end), (KIND_FORCE_EOS, sp.eos)]:
        assert m[k].nonzero()[:, 0].tolist() == [t]


def _fake_rows(tiny, n_reason=(3, 0), seed=0):
    g = torch.Generator().manual_seed(seed)
    sp, rows = tiny.special, []
    for i, n in enumerate(n_reason):
        words = " ".join(WORDS[j] for j in torch.randint(len(WORDS), (n,), generator=g).tolist())
        mesh = torch.randint(tiny.codec.vocab_size, (tiny.codec.seq_len,), generator=g)
        text = build_prompt("a red chair" if i % 2 else "table", "single")
        rows.append(build_sequence(tiny.tokenizer, sp, text, words, mesh))
    return rows


def test_build_sequence_and_kinds(tiny):
    sp = tiny.special
    row = _fake_rows(tiny, (3,))[0]
    ids = row["input_ids"]
    assert ids[row["reasoning_end"]] == sp.mesh_start and row["mesh_end"] - row["mesh_start"] == 512
    assert ids[row["mesh_end"]] == sp.mesh_end and ids[row["mesh_end"] + 1] == sp.eos and len(ids) == row["mesh_end"] + 2
    b = collate([row], sp)
    k = b["kinds"][0]
    assert (k[:3] == KIND_REASONING).all() and k[3] == KIND_REASONING
    assert (k[4:516] == KIND_MESH).all() and k[516] == KIND_FORCE_END and k[517] == KIND_FORCE_EOS
    row["reasoning_truncated"] = True
    assert collate([row], sp)["kinds"][0, 3] == KIND_FORCE_START


def test_completion_logprobs_matches_naive_and_is_differentiable(tiny):
    sp, model = tiny.special, tiny.model
    rows = _fake_rows(tiny, (4, 0))
    b = collate(rows, sp)
    with torch.no_grad():
        lp, mask = completion_logprobs(model, b["input_ids"], b["attention_mask"], b["prompt_lens"],
                                           b["kinds"], sp, temperature=0.7, chunk_size=100)
    assert lp.dtype == torch.float32 and lp.shape == b["kinds"].shape
    # naive: each row alone, full logits, masked log_softmax
    for i, r in enumerate(rows):
        ids = torch.tensor([r["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, r["prompt_len"] - 1:-1]
        kinds = b["kinds"][i, :len(r["input_ids"]) - r["prompt_len"]]
        want = torch.log_softmax(logits / 0.7 + sp.kind_bias("cpu")[kinds], -1)
        want = want.gather(1, ids[0, r["prompt_len"]:, None])[:, 0]
        n = len(want)
        assert torch.allclose(lp[i, :n], want, atol=1e-5)
        assert mask[i, :n].all() and not mask[i, n:].any() and (lp[i, n:] == 0).all()
        forced = (kinds == KIND_FORCE_END) | (kinds == KIND_FORCE_EOS)
        assert forced.sum() == 2 and (lp[i, :n][forced] == 0).all()
    # right padding gives the same values as left padding; grads flow through the checkpointed chunks
    P = b["attention_mask"].shape[1]
    ids_r = torch.full_like(b["input_ids"], sp.pad)
    att_r = torch.zeros_like(b["attention_mask"])
    for i, r in enumerate(rows):
        ids_r[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        att_r[i, :len(r["input_ids"])] = 1
    model.zero_grad()
    lp2, _ = completion_logprobs(model, ids_r, att_r, b["prompt_lens"], b["kinds"], sp, 0.7, chunk_size=64)
    assert torch.allclose(lp2.detach(), lp, atol=1e-5)
    (lp2 * mask).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_the_policy_library_has_no_import_circle():
    """stages/policy/ imports one way (tokenizer.py -> sequence.py, never back, not even for a type)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "stages" / "policy"
    deps = {f.stem: {n.module.rsplit(".", 1)[1] for n in ast.walk(ast.parse(f.read_text()))
                     if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("rl3d.stages.policy.")}
            for f in root.glob("*.py")}

    def reaches(a, b, seen=()):
        return any(d == b or (d not in seen and reaches(d, b, (*seen, d))) for d in deps.get(a, ()))

    assert "sequence" in deps["tokenizer"] and not deps["sequence"]
    assert [m for m in deps if reaches(m, m)] == []


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kind_head_logprobs_equal_the_masked_full_log_softmax(temperature):
    """Logits over each kind's allowed rows only (a run of ids as a slice, scattered text ids as an
    index) give the masked full-row log-softmax: forced positions exactly 0, a forbidden target -inf,
    padding 0, and the same gradients."""
    from rl3d.stages.policy.sampler import kind_head_logprobs, token_logprobs
    from rl3d.stages.policy.sequence import KIND_PAD, KIND_REASONING, SpecialIds, allowed_mask

    torch.manual_seed(0)
    sp = SpecialIds(mesh_ids=torch.arange(10, 18), mesh_start=18, mesh_end=19, eos=1, pad=0,
                    text_ids=torch.tensor([2, 3, 4, 5, 6, 7, 8, 9, 20, 22]), vocab_size=24)
    head = torch.nn.Linear(16, 24, bias=True)
    kinds = torch.randint(0, KIND_PAD + 1, (3, 40))
    allowed = allowed_mask(sp)
    targets = torch.stack([torch.multinomial(allowed[k].float(), 1).squeeze(0) for k in kinds.reshape(-1)]).view(3, 40)
    reasoning = (kinds == KIND_REASONING).nonzero()[0]
    targets[reasoning[0], reasoning[1]] = 12  # a mesh id where text is expected: forbidden
    h = torch.randn(3, 40, 16, requires_grad=True)
    want = token_logprobs(head(h), kinds, targets, sp, temperature)
    got = kind_head_logprobs(h, head, kinds, targets, sp, temperature, budget=50)
    assert got[reasoning[0], reasoning[1]] == float("-inf") == want[reasoning[0], reasoning[1]]
    forced = (kinds == KIND_FORCE_START) | (kinds == KIND_FORCE_END) | (kinds == KIND_FORCE_EOS)
    assert forced.any() and (got[forced] == 0).all()
    assert (got[kinds == KIND_PAD] == 0).all()
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-6, rtol=1e-6)
    params = [h, head.weight, head.bias]
    g_want = torch.autograd.grad(want[finite].sum(), params)
    g_got = torch.autograd.grad(got[finite].sum(), params)
    for a, c in zip(g_want, g_got):
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)
