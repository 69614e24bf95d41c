"""Benchmark rl3d's constrained sampler against plain `transformers` generate.

Hi-GRPO gen of 8 prompts x G=8 (two levels, meshes written), and, on the same batch of 64 coarse
prompts, rl3d's sampler vs `model.generate(do_sample=True)` with a LogitsProcessor that applies the
same constraint masks. Prints seconds and the ratio, with the core count.

    python benchmarks/bench_gen.py [--policy DIR] [--group-size 8] [--prompts 8] [--device cpu]

Without --policy: the shipped default policy if built, else a random-init Qwen2 of the default size
(hidden 256, 6 layers, 4 heads, 2 kv heads, intermediate 704, ~1200 text words + the codec's K mesh
tokens) saved to a temp dir.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from rl3d.stages import gen
from rl3d.stages.policy.checkpoint import Policy, default_policy_dir, load_policy, save_policy
from rl3d.stages.policy.sampler import Sampling, left_padded, sample_sequences
from rl3d.stages.policy.sequence import (INSTRUCTIONS, KIND_FORCE_END, KIND_FORCE_EOS, KIND_FORCE_START, KIND_MESH,
                                         KIND_REASONING, REQUEST, build_prompt, encode_text)
from rl3d.stages.policy.tokenizer import SpecialIds

PROMPTS = ["a red wooden chair with four legs", "a tall blue table lamp", "a small green car with round wheels",
           "a white sofa with two cushions", "a yellow rubber duck", "a stone arch bridge",
           "a wooden bookshelf with three shelves", "an orange traffic cone"]


def random_default_policy(out: Path) -> Path:
    """A random-init Qwen2 of the default size with a word-level tokenizer over ~1200 words."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from rl3d.formats.codec import MESH_END, MESH_START, VoxelCodec, mesh_token_text

    codec = VoxelCodec.load()
    specials = ["<|pad|>", "<|endoftext|>", "[UNK]", "<|user|>", "<|assistant|>", MESH_START, MESH_END]
    words = sorted({w for p in PROMPTS + [REQUEST] + list(INSTRUCTIONS.values()) for w in p.split()})
    words += [f"w{i}" for i in range(1200 - len(words))]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    tk.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|pad|>", unk_token="[UNK]")
    tok.add_tokens([AddedToken(mesh_token_text(i), special=True) for i in range(codec.vocab_size)], special_tokens=True)
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=704, vocab_size=len(tok), max_position_embeddings=2048,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return save_policy(out, Qwen2ForCausalLM(cfg), tok, codec, step=0, base="random-init", codec_ref="default")


class ConstraintProcessor:
    """transformers LogitsProcessor with rl3d's masks: the row state is re-derived from the ids
    generated so far (vectorised), then the same kind -> bias table is added."""

    def __init__(self, special: SpecialIds, prompt_width: int, max_reasoning: int, seq_len: int):
        self.sp, self.P, self.R, self.M = special, prompt_width, max_reasoning, seq_len
        self.is_mesh = torch.zeros(special.vocab_size, dtype=torch.bool)
        self.is_mesh[special.mesh_ids] = True

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        g = input_ids[:, self.P:]
        started = (g == self.sp.mesh_start).any(1)
        n_gen = g.shape[1]
        n_mesh = self.is_mesh.to(g.device)[g].sum(1) if n_gen else torch.zeros_like(started, dtype=torch.long)
        ended = (g == self.sp.mesh_end).any(1)
        kinds = torch.where(~started, torch.where(torch.full_like(started, n_gen >= self.R), KIND_FORCE_START,
                                                  KIND_REASONING),
                            torch.where(n_mesh < self.M, KIND_MESH,
                                        torch.where(ended, KIND_FORCE_EOS, KIND_FORCE_END)))
        return scores + self.sp.kind_bias(scores.device, scores.dtype)[kinds]


def hf_generate(policy: Policy, prompt_ids: list[list[int]], sampling: Sampling) -> torch.Tensor:
    from transformers import LogitsProcessorList

    sp = policy.special
    ids, att = left_padded(prompt_ids, sp.pad, device=policy.device)
    proc = ConstraintProcessor(sp, ids.shape[1], sampling.max_reasoning_tokens, policy.codec.seq_len)
    return policy.model.generate(
        input_ids=ids, attention_mask=att, do_sample=True, temperature=sampling.temperature,
        top_p=sampling.top_p, top_k=sampling.top_k or None, logits_processor=LogitsProcessorList([proc]),
        max_new_tokens=sampling.max_reasoning_tokens + policy.codec.seq_len + 3, eos_token_id=sp.eos,
        pad_token_id=sp.pad)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default=None)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-reasoning-tokens", type=int, default=64)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--no-baseline", action="store_true", help="only time rl3d gen (skip transformers generate)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_gen_")
    if args.policy:
        pdir = Path(args.policy)
    else:
        try:
            pdir = default_policy_dir()
        except Exception:
            pdir = random_default_policy(Path(tmp) / "policy")
    policy = load_policy(pdir, args.device, args.dtype)
    n_params = sum(p.numel() for p in policy.model.parameters())
    print(f"policy {pdir} ({n_params / 1e6:.1f}M params, vocab {policy.special.vocab_size}, K={policy.special.k}); "
          f"device {policy.device}, dtype {policy.model.dtype}; torch threads {torch.get_num_threads()}, "
          f"cores {os.cpu_count()}")
    sampling = Sampling(max_reasoning_tokens=args.max_reasoning_tokens)
    rows = [{"prompt_id": f"p{i}", "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(args.prompts)]
    G = args.group_size

    t0 = time.time()
    out = gen.generate(policy, rows, "hi-grpo", G, seed=0, sampling=sampling, batch_size=len(rows) * G, out_dir=tmp)
    t_full = time.time() - t0
    n_tok = sum(len(r["input_ids"]) - r["prompt_len"] for r in out)
    print(f"rl3d gen hi-grpo {len(rows)} prompts x G={G} x 2 levels: {t_full:.1f} s "
          f"({n_tok / t_full:.0f} tokens/s, {sum(r['status'] == 'ok' for r in out)}/{len(out)} ok) "
          f"[target <= 60 s on 2 CPU cores]")

    if args.no_baseline:
        return
    texts = [build_prompt(r["prompt"], "coarse") for r in rows for _ in range(G)]
    prompt_ids = [encode_text(policy.tokenizer, t) for t in texts]
    seeds = list(range(len(prompt_ids)))
    t0 = time.time()
    ours = sample_sequences(policy.model, policy.special, prompt_ids, seeds, policy.codec.seq_len, sampling)
    t_ours = time.time() - t0
    torch.manual_seed(0)
    t0 = time.time()
    with torch.no_grad():
        theirs = hf_generate(policy, prompt_ids, sampling)
    t_hf = time.time() - t0
    P = max(map(len, prompt_ids))
    hf_mesh = torch.isin(theirs[:, P:], policy.special.mesh_ids.to(theirs.device)).sum(1)
    print(f"one level, {len(prompt_ids)} sequences: rl3d sampler {t_ours:.1f} s "
          f"({sum(len(o['tokens']) for o in ours)} tokens), transformers generate + LogitsProcessor {t_hf:.1f} s "
          f"({int((theirs[:, P:] != policy.special.pad).sum())} tokens; mesh tokens per row "
          f"{int(hf_mesh.min())}..{int(hf_mesh.max())}); speed-up {t_hf / t_ours:.2f}x")


if __name__ == "__main__":
    main()
