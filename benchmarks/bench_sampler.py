"""Sampler speed at the real model shapes: rl3d's fixed-shape sampler (CUDA graphs) against the
plain sampler loop and `transformers` generate with the same constraint masks, in one run.

Random-init Qwen2 models of the Qwen2.5 0.5B / 1.5B / 7B shapes, built directly on the device in
bf16, with a vocabulary of `--text-vocab` text tokens + <mesh-start>/<mesh-end> + `--mesh-vocab` mesh
tokens (ours: 13.5k text + 8,192 mesh ~ 21.7k; the real ShapeLLM-Omni vocab: 151,665 text + 8,192
mesh ~ 160k). Each row reasons for `--max-reasoning` tokens (a random-init model rarely emits
<mesh-start> early, so every row uses the whole budget) and then samples `--mesh-tokens` mesh tokens.

    python benchmarks/bench_sampler.py --shapes 0.5b,1.5b,7b --batches 8,64,256 [--real-vocab-7b]
    python benchmarks/bench_sampler.py --shapes tiny --batches 4 --device cpu   # a check that it runs
    python benchmarks/bench_sampler.py --shapes default --batches 256,1024 --mesh-tokens 512 --baselines '' \
        --max-reasoning 128 --profile --profile-batch 1024   # the embedded default policy, its own vocabulary

The baselines are slow, so they are timed over their first `--baseline-tokens` new tokens (a per-token
rate: their step cost is launch-bound and grows with length, so this flatters them); the fixed-shape
sampler is timed over whole rows. Also printed per shape: how closely its stored log-probs match the
plain sampler's and a training-style recomputation (bf16), and where a step's GPU time goes
(profiler, eager step).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from bench_gen import ConstraintProcessor  # the same masks for transformers generate (benchmarks/ is on the path)
from rl3d.stages.policy.sampler import (Sampling, completion_logprobs, left_padded, position_ids_from_mask,
                                        sample_sequences)
from rl3d.stages.policy.sequence import collate, sequence_spans
from rl3d.stages.policy.static_sampler import _DecodeLoop, sample_sequences_static
from rl3d.stages.policy.tokenizer import SpecialIds

SHAPES = {  # Qwen2.5 dimensions
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944),
}


def special_ids(text_vocab: int, mesh_vocab: int) -> SpecialIds:
    """Ids laid out as text (eos = 0, pad = 1), <mesh-start>, <mesh-end>, then the mesh tokens."""
    return SpecialIds(mesh_ids=torch.arange(text_vocab + 2, text_vocab + 2 + mesh_vocab), mesh_start=text_vocab,
                      mesh_end=text_vocab + 1, eos=0, pad=1, text_ids=torch.arange(2, text_vocab),
                      vocab_size=text_vocab + 2 + mesh_vocab)


def build_model(shape: str, vocab: int, device: str, dtype: torch.dtype, max_pos: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[shape], vocab_size=vocab, max_position_embeddings=max_pos, rope_theta=1e6,
                      tie_word_embeddings=shape in ("tiny", "0.5b", "1.5b"), eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def prompts(B: int, text_vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(40, 64, (B,), generator=g)
    return [torch.randint(2, text_vocab, (int(n),), generator=g).tolist() for n in lens]


def policy_prompts(policy, B: int) -> list[list[int]]:
    """Coarse-level prompts of the shipped policy, as gen builds them (so its reasoning and mesh
    distributions, and hence the top-p nucleus sizes, are the real ones)."""
    from rl3d.stages.policy.sequence import build_prompt, encode_text

    words = ["a red chair", "a tall blue lamp", "a small wooden table", "a green mug with a handle",
             "a white sofa", "a yellow toy car", "a stone bench", "a black shelf"]
    return [encode_text(policy.tokenizer, build_prompt(words[i % len(words)], "coarse", fmt=policy.prompt_format))
            for i in range(B)]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def hf_generate(model, sp, prompt_ids, sampling, seq_len, new_tokens):
    from transformers import LogitsProcessorList

    ids, att = left_padded(prompt_ids, sp.pad, device=next(model.parameters()).device)
    proc = ConstraintProcessor(sp, ids.shape[1], sampling.max_reasoning_tokens, seq_len)
    return model.generate(input_ids=ids, attention_mask=att, do_sample=True,
                          temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None,
                          logits_processor=LogitsProcessorList([proc]), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, eos_token_id=sp.eos, pad_token_id=sp.pad)


def logprob_agreement(model, sp, prompt_ids, static_rows, plain_rows, sampling):
    """Rows whose tokens are identical; max |logp| difference to the plain sampler on the common prefix; mean
    and max |logp_gen - logp_train| against completion_logprobs (training-style, no cache) on all tokens."""
    same = sum(a["tokens"] == b["tokens"] for a, b in zip(static_rows, plain_rows))
    d_plain = 0.0
    for a, b in zip(static_rows, plain_rows):
        n = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), len(a["tokens"]))
        if n:
            d_plain = max(d_plain, float(abs(a["logprobs"][:n] - b["logprobs"][:n]).max()))
    dev = next(model.parameters()).device
    B = len(prompt_ids)
    M = len(static_rows[0]["tokens"]) - static_rows[0]["n_reasoning"] - 3
    rows = [{"input_ids": p + r["tokens"], **sequence_spans(len(p), r["n_reasoning"], M),
             "reasoning_truncated": r["truncated"]} for p, r in zip(prompt_ids, static_rows)]
    with torch.no_grad():
        lp, mask = completion_logprobs(model, **collate(rows, sp, dev), special=sp, temperature=sampling.temperature)
    gen = torch.zeros_like(lp)
    for i, r in enumerate(static_rows):
        gen[i, :len(r["logprobs"])] = torch.as_tensor(r["logprobs"], device=dev)
    d = (gen - lp).abs()[mask]
    return {"rows_identical_to_plain": f"{same}/{B}", "max_dlogp_vs_plain_common_prefix": round(d_plain, 5),
            "mean_dlogp_vs_recompute": round(float(d.mean()), 5), "max_dlogp_vs_recompute": round(float(d.max()), 4)}


def step_profile(model, sp, prompt_ids, seq_len, sampling, device, out_dir):
    """GPU kernel time of a few eager steps by operator (the graph replays the same kernels)."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(device)
    steps = sampling.max_reasoning_tokens + 1 + seq_len
    ids, att = left_padded(prompt_ids, sp.pad, steps, dev)
    B, P = ids.shape
    with torch.no_grad():
        loop = _DecodeLoop(model, sp, ids, att, position_ids_from_mask(att[:, :P]), torch.arange(B, device=dev),
                           seq_len, sampling, steps)
        for _ in range(3):
            loop.step()
        sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                loop.step()
            sync(device)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    if out_dir:
        Path(out_dir, "profile.txt").open("a").write(table + "\n")
    return table


@contextlib.contextmanager
def transformers_decode_attention():
    """The baseline "static-sdpa": the static sampler as it was before policy/attention.py, with
    transformers' own sdpa in the decode step (a copy of the cache per query head when the mask is
    given, in transformers < 5.25) and the whole cache read every step."""
    from transformers import AttentionInterface

    from rl3d.stages.policy import attention, static_sampler

    attention.install_decode_attention()  # records transformers' function
    AttentionInterface.register("sdpa", attention._sdpa)
    installer, static_sampler.install_decode_attention = static_sampler.install_decode_attention, lambda: None
    try:
        yield
    finally:
        static_sampler.install_decode_attention = installer
        AttentionInterface.register("sdpa", attention.decode_sdpa)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="0.5b")
    ap.add_argument("--batches", default="8,64,256")
    ap.add_argument("--text-vocab", type=int, default=13_500)
    ap.add_argument("--mesh-vocab", type=int, default=8192)
    ap.add_argument("--real-vocab-7b", action="store_true", help="7b: 151,665 text tokens (ShapeLLM-Omni's)")
    ap.add_argument("--mesh-tokens", type=int, default=1024)
    ap.add_argument("--max-reasoning", type=int, default=64)
    ap.add_argument("--baseline-tokens", type=int, default=128)
    ap.add_argument("--baselines", default="generate,plain",
                    help="comma list of generate,plain,static-sdpa ('' = none); static-sdpa: whole rows of the "
                         "static sampler with transformers' decode attention and the whole cache read")
    ap.add_argument("--sampling", default="default", choices=["default", "shapellm"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-batch", type=int, default=64, help="the batch --profile profiles")
    ap.add_argument("--no-static", action="store_true", help="time only the baselines")
    ap.add_argument("--json", default=None, help="append one JSON line per measurement to this file")
    args = ap.parse_args()
    dev = args.device
    dtype = torch.bfloat16 if torch.device(dev).type == "cuda" else torch.float32
    base = {"default": Sampling(), "shapellm": Sampling(temperature=0.7, top_p=0.7, top_k=8192)}[args.sampling]
    sampling = Sampling(base.temperature, base.top_p, base.top_k, args.max_reasoning)
    card = torch.cuda.get_device_name() if torch.device(dev).type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"card: {card}; torch {torch.__version__}; sampling {sampling}; mesh tokens {args.mesh_tokens}")
    baselines = [b for b in args.baselines.split(",") if b]
    for shape in args.shapes.split(","):
        text_vocab = 151_665 if (shape == "7b" and args.real_vocab_7b) else args.text_vocab
        if shape == "default":  # the shipped policy: its trained weights, tokenizer and constraint ids
            from rl3d.stages.policy.checkpoint import load_policy

            policy = load_policy(device=dev)
            model, sp, text_vocab = policy.model, policy.special, None
        else:
            sp = special_ids(text_vocab, args.mesh_vocab)
            model = build_model(shape, sp.vocab_size, dev, dtype, 4096)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"\n== {shape}: {n_params / 1e9:.2f}B params, vocab {sp.vocab_size}")
        print(f"{'batch':>5} {'variant':<34} {'tokens':>8} {'seconds':>8} {'tok/s':>9} {'vs generate':>11} "
              f"{'vs plain':>9}  peak GiB")
        pids_warm = policy_prompts(policy, 2) if shape == "default" else prompts(2, text_vocab)
        if "generate" in baselines:  # warm-up: the first generate call pays one-time CUDA/cuBLAS set-up
            with torch.no_grad():
                hf_generate(model, sp, pids_warm, sampling, args.mesh_tokens, 4)
        for B in (int(b) for b in args.batches.split(",")):
            pids = policy_prompts(policy, B) if shape == "default" else prompts(B, text_vocab)
            seeds = list(range(B))
            rates = {}
            short = Sampling(sampling.temperature, sampling.top_p, sampling.top_k, args.max_reasoning)
            for name in baselines:  # per-token rates over the first baseline-tokens tokens
                n = args.baseline_tokens
                if torch.device(dev).type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                if name == "static-sdpa":
                    with transformers_decode_attention():
                        sample_sequences_static(model, sp, pids[:min(B, 8)], seeds[:min(B, 8)], 8, sampling,
                                                kv_block=1 << 30)  # warm-up
                        rows_b, sec = timed(lambda: sample_sequences_static(model, sp, pids, seeds, args.mesh_tokens,
                                                                            sampling, kv_block=1 << 30), dev)
                    tokens = sum(len(r["tokens"]) for r in rows_b)
                    rates["plain"] = tokens / sec  # the column "vs plain" compares against this arm
                    report(B, "static-sdpa (whole rows)", tokens, sec, rates, dev, args.json, shape)
                    continue
                if name == "generate":
                    torch.manual_seed(0)
                    with torch.no_grad():
                        _, sec = timed(lambda: hf_generate(model, sp, pids, short, args.mesh_tokens, n), dev)
                    tokens = B * n
                else:
                    m = max(1, n - args.max_reasoning - 1)
                    _, sec = timed(lambda: sample_sequences(model, sp, pids, seeds, m, short), dev)
                    tokens = B * (args.max_reasoning + 1 + m)
                rates[name] = tokens / sec
                report(B, f"{name} (first {n} tokens)", tokens, sec, rates, dev, args.json, shape)
            if not args.no_static:
                sample_sequences_static(model, sp, pids[:min(B, 8)], seeds[:min(B, 8)], 8, sampling)  # warm-up
                if torch.device(dev).type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                rows, sec = timed(lambda: sample_sequences_static(model, sp, pids, seeds, args.mesh_tokens, sampling),
                                  dev)
                tokens = sum(len(r["tokens"]) for r in rows)
                rates["static"] = tokens / sec
                label = "static + CUDA graph" if torch.device(dev).type == "cuda" else "static (no graph on CPU)"
                report(B, f"{label} (whole rows)", tokens, sec, rates, dev, args.json, shape)
            if B == 64 or B == min(int(b) for b in args.batches.split(",")):
                agree_b = min(B, 16)
                ref = sample_sequences(model, sp, pids[:agree_b], seeds[:agree_b], args.mesh_tokens, sampling)
                agree = logprob_agreement(model, sp, pids[:agree_b], rows[:agree_b], ref, sampling)
                print(f"      log-probs (batch {agree_b}): {agree}")
                if args.json:
                    Path(args.json).open("a").write(json.dumps({"shape": shape, "batch": agree_b, **agree}) + "\n")
            if args.profile and B == args.profile_batch:
                print(step_profile(model, sp, pids, args.mesh_tokens, sampling, dev, os.environ.get("OUT")))
        del model
        if torch.device(dev).type == "cuda":
            torch.cuda.empty_cache()


def report(B, name, tokens, sec, rates, dev, json_path, shape):
    rate = tokens / sec
    vs_gen = f"{rate / rates['generate']:.1f}x" if "generate" in rates else "-"
    vs_plain = f"{rate / rates['plain']:.1f}x" if "plain" in rates else "-"
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.device(dev).type == "cuda" else float("nan")
    print(f"{B:>5} {name:<34} {tokens:>8} {sec:>8.2f} {rate:>9.0f} {vs_gen:>11} {vs_plain:>9}  {peak:.1f}", flush=True)
    if json_path:
        Path(json_path).open("a").write(json.dumps({"shape": shape, "batch": B, "variant": name, "tokens": tokens,
                                                    "seconds": round(sec, 4), "tok_per_s": round(rate, 1),
                                                    "peak_gib": round(peak, 2)}) + "\n")


if __name__ == "__main__":
    sys.exit(main())
