"""ShapeLLM-Omni-class policies on CPU: a tiny random Qwen2.5-VL (text and vision towers) whose
tokenizer has the mesh tokens added after its own specials (as ShapeLLM-Omni's do), and a
reduced-size replica of the 64^3 VQ-VAE codec referenced by path. gen -> render -> reward ->
rl-step end to end, sft, and the one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import qwen_like_tokenizer, save_codec, save_replica

from rl3d.cli.main import main
from rl3d.formats import tables
from rl3d.formats.codec import MESH_END, MESH_START, mesh_token_text
from rl3d.formats.errors import InputError
from rl3d.stages.codecs.vqvae64 import VQVAE64Codec
from rl3d.stages.policy.checkpoint import POLICY_META, load_policy
from rl3d.stages.policy.sampler import CompletionLogprobs, resolve_sampling
from rl3d.stages.policy.sequence import collate

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwenvl")
    save_codec(root / "vqvae")
    tok = qwen_like_tokenizer(16)
    return root, save_replica(root / "policy", root / "vqvae", tok)


def test_mesh_ids_are_discovered_from_the_tokenizer(replica):
    root, policy_dir = replica
    pol = load_policy(policy_dir, device="cpu", dtype="float32")
    vocab = pol.tokenizer.get_vocab()
    assert pol.codec.seq_len == 1024 and pol.codec.vocab_size == 16
    assert pol.special.mesh_ids.tolist() == [vocab[mesh_token_text(i)] for i in range(16)]
    # codes first, then <mesh-start>, <mesh-end> (ShapeLLM-Omni's order), none at a fixed offset
    assert pol.special.mesh_start == pol.special.mesh_ids[-1] + 1 and pol.special.mesh_end == pol.special.mesh_start + 1
    text = set(pol.special.text_ids.tolist())
    assert not text & {pol.special.mesh_start, pol.special.mesh_end, *pol.special.mesh_ids.tolist()}
    assert vocab["<|im_start|>"] not in text and vocab["<|image_pad|>"] not in text
    prompt = pol.prompt_format.wrap("hi")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("skip,with_end,expected", [
    ((5, 6, 7, 8, 9), True, "tokenizer lacks 5 of the codec's mesh tokens: <mesh5>..<mesh9>"),
    ((3,), False, "tokenizer lacks 2 of the codec's mesh tokens: <mesh-end>, <mesh3>"),
])
def test_a_tokenizer_without_mesh_tokens_is_a_one_line_error(replica, tmp_path, skip, with_end, expected):
    root, _ = replica
    d = save_replica(tmp_path / "policy", root / "vqvae", qwen_like_tokenizer(16, skip=skip, with_end=with_end))
    with pytest.raises(InputError) as e:
        load_policy(d, device="cpu")
    assert expected in str(e.value) and "\n" not in str(e.value)
    r = CliRunner().invoke(main, ["gen", "--prompts", str(_prompts(tmp_path)), "--policy", str(d), "--out",
                                  str(tmp_path / "gen"), "--device", "cpu"])
    assert r.exit_code == 2 and expected in r.output


def test_no_mesh_tokens_at_all(replica, tmp_path):
    root, _ = replica
    d = save_replica(tmp_path / "policy", root / "vqvae", qwen_like_tokenizer(None))
    with pytest.raises(InputError, match=r"lacks 18 of the codec's mesh tokens: <mesh-start>, <mesh-end>, "
                                         r"<mesh0>..<mesh15>"):
        load_policy(d, device="cpu")


def test_codec_hash_is_checked(replica, tmp_path):
    root, policy_dir = replica
    meta = json.loads((policy_dir / POLICY_META).read_text())
    d = tmp_path / "policy"
    save_replica(d, root / "vqvae", qwen_like_tokenizer(16))
    (d / POLICY_META).write_text(json.dumps({**meta, "codec_hash": "0" * 16}))
    with pytest.raises(InputError, match="has hash .* but the policy was trained with codec 0000"):
        load_policy(d, device="cpu")


def test_sampling_preset():
    s = resolve_sampling("shapellm")
    assert (s.temperature, s.top_p, s.top_k) == (0.7, 0.7, 8192)
    assert resolve_sampling(None, {"sampling": "shapellm"}, top_p=0.9).top_p == 0.9
    assert resolve_sampling(None, {}).top_p == 0.95
    with pytest.raises(InputError, match="expected one of default, shapellm"):
        resolve_sampling("nope")


def _prompts(root: Path) -> Path:
    f = root / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": p}) + "\n"
                         for i, p in enumerate(["a red chair", "a tall blue table"])))
    return f


GEOMETRY_ONLY = """
name = "geometry-64"
description = "geometry terms only, and the spec term (not applicable to uncoloured 64^3 occupancy)"
{levels}
"""
TERM = """
[[levels.{level}]]
name = "{name}"
backend = "{backend}"
weight = 1.0
aggregate = "none"
"""


def _reward_config(root: Path) -> Path:
    terms = "".join(TERM.format(level=lv, name=n, backend=b) for lv in ("coarse", "fine")
                    for n, b in (("non_degenerate", "geometry"), ("largest_component", "geometry"),
                                 ("ground_contact", "geometry"), ("spec", "spec")))
    f = root / "geometry.toml"
    f.write_text(GEOMETRY_ONLY.format(levels=terms))
    return f


def _cli(*args):
    r = CliRunner().invoke(main, [*map(str, args), "--quiet"])
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def loop(replica):
    """gen (hi-grpo, G=2, the policy's shapellm preset) -> render -> reward -> rl-step, through the CLI."""
    root, policy_dir = replica
    run = root / "run"
    _cli("gen", "--prompts", _prompts(root), "--policy", policy_dir, "--group-size", 2, "--max-reasoning-tokens", 6,
         "--device", "cpu", "--out", run / "gen")
    _cli("render", "--samples", run / "gen", "--views", 1, "--resolution", 24, "--out", run / "renders")
    _cli("reward", "--samples", run / "gen", "--renders", run / "renders", "--config", _reward_config(root),
         "--out", run / "rewards")
    _cli("rl-step", "--policy", policy_dir, "--samples", run / "gen", "--rewards", run / "rewards", "--lr", 1e-2,
         "--beta", 0.01, "--device", "cpu", "--out", run / "step-1")
    return root, policy_dir, run


def test_gen_samples_exactly_seq_len_mesh_tokens_with_the_preset(loop):
    root, policy_dir, run = loop
    rows = tables.read_table(run / "gen", "samples").to_pylist()
    assert len(rows) == 2 * 2 * 2 and {r["level"] for r in rows} == {"coarse", "fine"}
    pol = load_policy(policy_dir, device="cpu")
    is_mesh = set(pol.special.mesh_ids.tolist())
    for r in rows:
        completion = r["input_ids"][r["prompt_len"]:]
        assert sum(t in is_mesh for t in completion) == 1024 == len(r["mesh_tokens"])
        assert r["input_ids"][r["mesh_start"] - 1] == pol.special.mesh_start
        assert r["input_ids"][r["mesh_end"]] == pol.special.mesh_end
        assert (r["temperature"], r["top_p"], r["top_k"]) == (0.7, 0.7, 8192)
        assert r["input_ids"][:r["prompt_len"]] == pol.tokenizer.encode(
            pol.prompt_format.wrap(f"Please generate a 3D mesh based on the prompt I provided: {r['prompt']}\n"
                                   + r_instruction(r, rows)), add_special_tokens=False)
    config = tables.table_config(run / "gen")
    assert config["codec"] == str((root / "vqvae").resolve()) and config["chat_template"] is True
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all((run / "gen" / r["mesh_path"]).is_file() for r in ok)


def r_instruction(r, rows) -> str:
    from rl3d.stages.policy.sequence import INSTRUCTIONS

    if r["level"] == "coarse":
        return INSTRUCTIONS["coarse"]
    plan = next(x["reasoning"] for x in rows if x["level"] == "coarse" and x["prompt_id"] == r["prompt_id"]
                and x["sample_index"] == r["sample_index"])
    return INSTRUCTIONS["fine"].format(plan=plan.strip())


def test_stored_logprobs_match_a_recomputation_and_a_plain_forward(loop):
    root, policy_dir, run = loop
    rows = tables.read_table(run / "gen", "samples").to_pylist()[:4]
    pol = load_policy(policy_dir, device="cpu")
    for right_padded in (False, True):  # the update's layout: no padding mask reaches the model
        batch = collate(rows, pol.special, right_padded=right_padded)
        with torch.no_grad():
            lp, mask = CompletionLogprobs(pol.model, pol.special, 0.7)(**batch)
        for i, r in enumerate(rows):
            n = len(r["input_ids"]) - r["prompt_len"]
            np.testing.assert_allclose(lp[i, :n].numpy(), r["logprobs"], atol=2e-4)
    # the mesh tokens' log-probs from a plain (unpadded, no position ids) forward of one sequence
    r = rows[0]
    ids = torch.tensor([r["input_ids"]])
    with torch.no_grad():
        logits = pol.model(input_ids=ids).logits[0].float() / 0.7
    mesh = pol.special.mesh_ids
    pos = torch.arange(r["mesh_start"], r["mesh_end"])
    plain = torch.log_softmax(logits[pos - 1][:, mesh], -1)
    codes = torch.as_tensor(r["mesh_tokens"], dtype=torch.long)
    stored = torch.as_tensor(r["logprobs"][r["mesh_start"] - r["prompt_len"]:r["mesh_end"] - r["prompt_len"]])
    np.testing.assert_allclose(plain[torch.arange(len(codes)), codes].numpy(), stored.numpy(), atol=2e-4)


def test_reward_decodes_the_64_cubed_grids_and_marks_spec_not_applicable(loop):
    root, policy_dir, run = loop
    rew = tables.read_table(run / "rewards", "rewards").to_pylist()
    assert all(r["spec_status"] == "not_applicable" and "64x64x64 occupancy" in r["spec_message"] for r in rew
               if r["status"] != "decode_error")
    ok = [r for r in rew if r["status"] == "ok"]
    assert ok and all(r["non_degenerate_status"] == "ok" and r["total"] is not None for r in ok)


def test_rl_step_trains_the_text_side_only_and_keeps_the_codec_reference(loop):
    root, policy_dir, run = loop
    before, after = load_file(policy_dir / "model.safetensors"), load_file(run / "step-1" / "model.safetensors")
    # saved under the published checkpoint's names: visual.* (tower + merger), model.layers.*
    vision = [k for k in before if k.startswith("visual.")]
    text = [k for k in before if k.startswith("model.layers.")]
    assert vision and text and set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in text)
    meta = json.loads((run / "step-1" / POLICY_META).read_text())
    assert meta["codec"] == str((root / "vqvae" / "3DVQVAE.safetensors").resolve())
    assert meta["model_class"] == "Qwen2_5_VLForConditionalGeneration" and meta["chat_template"] is True
    assert meta["sampling"] == "shapellm" and not (run / "step-1" / "codec").exists()
    pol = load_policy(run / "step-1", device="cpu")
    assert pol.codec.content_hash() == meta["codec_hash"] and pol.prompt_format.chat_tokenizer is not None


def test_sft_fine_tunes_the_replica_on_vq_tokens(replica, tmp_path):
    """sft --init a Qwen2.5-VL policy on a table of mesh tokens (no voxels column): the coarse level's
    targets come from decoding, coarsening and re-encoding through the VQ-VAE; the vision tower stays."""
    root, policy_dir = replica
    codec = VQVAE64Codec.load(root / "vqvae")
    grids = np.zeros((4, 64, 64, 64), np.uint8)
    for i in range(4):  # boxes of whole 4^3 blocks standing on the ground
        grids[i, 16:48, :8 * (i + 2), 20:44] = 1
    tokens = codec.encode_batch(grids)
    import pyarrow as pa

    table = pa.table({"prompt": [f"a box {i}" for i in range(4)], "plan": ["a box"] * 4,
                      "detail": ["a plain grey box"] * 4,
                      "mesh_tokens": pa.array([t.tolist() for t in tokens], pa.list_(pa.int32()))})
    (tmp_path / "data").mkdir()
    pq.write_table(table, tmp_path / "data" / "part-000000.parquet")
    _cli("sft", "--data", tmp_path / "data", "--init", policy_dir, "--out", tmp_path / "sft", "--steps", 2,
         "--batch-size", 2, "--lr", 1e-3, "--eval-fraction", 0, "--mode", "hi-grpo")
    final = tmp_path / "sft" / "final"
    meta = json.loads((final / POLICY_META).read_text())
    assert meta["chat_template"] is True and meta["codec"] == str((root / "vqvae" / "3DVQVAE.safetensors").resolve())
    before, after = load_file(policy_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model.layers."))
    assert load_policy(final, device="cpu").codec.content_hash() == codec.content_hash()


def test_top_k_and_top_p_cuts_over_a_160k_vocabulary():
    """The shapellm preset's cuts at ShapeLLM-Omni's vocabulary width: every draw lies in the top-k
    set and in the top-p nucleus of its row."""
    from rl3d.stages.policy.sampler import sample_tokens

    V, B = 159_859, 16
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=g) * 4 / 0.7
    for top_k, top_p in ((8192, 0.7), (50, 1.0), (0, 0.3)):
        tok, lp = sample_tokens(logits, torch.arange(B) * 7919, step=3, top_k=top_k, top_p=top_p)
        probs = torch.softmax(logits, -1)
        p_tok = probs.gather(1, tok[:, None])
        rank = (probs > p_tok).sum(1)
        mass_before = (probs * (probs > p_tok)).sum(1)
        if top_k:
            assert (rank < top_k).all()
        assert (mass_before < top_p + 1e-6).all()
        # the draw's log-prob sums the 160k-row normaliser block by block (sampler.block_weights), in
        # another order than log_softmax: at |log p| ~ 30, float32 rounding differs by ~1e-5 from CPU to CPU
        torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0],
                                   atol=1e-4, rtol=1e-4)


def test_a_tokenizer_saved_as_qwen2tokenizer_loads_with_the_same_mesh_ids(tmp_path):
    """ShapeLLM-Omni's tokenizer_config.json names Qwen2Tokenizer: load_tokenizer takes the
    AutoTokenizer path for it, and the mesh ids and chat template come out the same."""
    from rl3d.stages.policy.tokenizer import load_tokenizer

    tok = qwen_like_tokenizer(16)
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "Qwen2Tokenizer"}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    loaded = load_tokenizer(tmp_path)
    assert type(loaded).__name__ == "Qwen2Tokenizer" and loaded.chat_template
    names = [mesh_token_text(i) for i in range(16)] + [MESH_START, MESH_END]
    assert loaded.convert_tokens_to_ids(names) == tok.convert_tokens_to_ids(names)
    text = "a red chair <mesh-start><mesh3><mesh-end>"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
