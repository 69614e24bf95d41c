"""Gen at the ShapeLLM-Omni 7B shape on one GPU, built in memory (random init: nothing to download).

The policy is a Qwen2_5_VLForConditionalGeneration with Qwen2.5-VL-7B's text config (hidden 3584,
28 layers, 28 heads, 4 KV heads, intermediate 18944) and vision tower, in bf16; the tokenizer has
Qwen2.5's id layout (151,643 text ids, 22 specials) with <mesh0>..<mesh8191>, <mesh-start>,
<mesh-end> added after them, so rl3d discovers ShapeLLM-Omni's published ids 151665..159856,
159857, 159858; the codec is the 64^3 VQ-VAE at the published size (random weights). It runs
rl3d's gen loop (stages/policy: prompt layout with the chat template, the constrained sampler with
the shapellm preset, then the VQ-VAE decode) for P prompts x G samples x the hi-grpo levels and
prints seconds, tokens/s and peak GPU memory as one JSON line.

    python examples/qwenvl_7b_gen.py                      # 16 prompts x G=8 x 2 levels, 1,024 mesh tokens
    python examples/qwenvl_7b_gen.py --tiny --device cpu  # the same code path at toy size
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from rl3d.formats.codec import MESH_END, MESH_START, mesh_token_text
from rl3d.formats.vqvae64 import VQVAE64Config
from rl3d.stages.codecs.vqvae64 import VQVAE3D, VQVAE64Codec, make_block_replica
from rl3d.stages.policy.sampler import resolve_sampling, row_seed
from rl3d.stages.policy.sampler_engines import choose_sampler
from rl3d.stages.policy.sequence import MODE_LEVELS, PromptFormat, build_prompt, encode_text
from rl3d.stages.policy.tokenizer import describe_mesh_ids, special_ids

QWEN_TEXT_IDS = 151_643  # Qwen2.5's byte-level BPE vocabulary; its 22 specials follow (151643..151664)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|special_{i}|>" for i in range(19)]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, max_position_embeddings=128000,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
VISION_7B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                 patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                 fullatt_block_indexes=[7, 15, 23, 31])
TEXT_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=64, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
VISION_TINY = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
PROMPTS = ["a wooden chair with four legs", "a tall floor lamp", "a round dining table", "a small sailboat",
           "an office chair with armrests", "a bookshelf with three shelves", "a coffee mug", "a desk with drawers",
           "a toy car", "a park bench", "a teapot", "a sofa with cushions", "a street lamp", "a cupboard",
           "a rocking horse", "a barstool"]


def qwen_layout_tokenizer(n_text: int, n_mesh: int):
    """Word-level stand-in with Qwen2.5's id layout: n_text text ids, the 22 specials, then the mesh
    tokens added as ShapeLLM-Omni adds them (codes first, then <mesh-start>, <mesh-end>)."""
    vocab = {f"w{i}": i for i in range(n_text)}
    vocab.update({t: n_text + i for i, t in enumerate(QWEN_SPECIALS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      chat_template=CHAT_TEMPLATE)
    wrapped.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[3:]})
    wrapped.add_tokens([mesh_token_text(i) for i in range(n_mesh)] + [MESH_START, MESH_END])
    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy sizes (a CPU check of the same code path)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--mode", default="hi-grpo", choices=list(MODE_LEVELS))
    ap.add_argument("--max-reasoning-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=128, help="sequences sampled together")
    ap.add_argument("--codec-batch", type=int, default=8, help="shapes per VQ-VAE decode pass")
    ap.add_argument("--sampler", default="auto", choices=["auto", "plain", "static"],
                    help="rl3d gen --sampler: static = fixed-shape steps as a CUDA graph (auto on CUDA)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON figures here too")
    args = ap.parse_args()
    dev = torch.device(args.device)
    t0 = time.time()
    n_text, n_mesh = (300, 16) if args.tiny else (QWEN_TEXT_IDS, 8192)
    tok = qwen_layout_tokenizer(n_text, n_mesh)
    text, vision = (TEXT_TINY, VISION_TINY) if args.tiny else (TEXT_7B, VISION_7B)
    cfg = Qwen2_5_VLConfig(text_config=dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id, bos_token_id=None, **text),
                           vision_config=vision)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with dev:
        model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    torch.set_default_dtype(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    vq = make_block_replica() if args.tiny else VQVAE3D(VQVAE64Config())
    codec = VQVAE64Codec(vq.to(dev), batch_size=args.codec_batch)
    special = special_ids(tok, codec, int(model.get_output_embeddings().weight.shape[0]), source="7B-shape tokenizer")
    fmt = PromptFormat(chat_tokenizer=tok)
    sampling = resolve_sampling("shapellm", max_reasoning_tokens=args.max_reasoning_tokens)
    engine, sample_fn = choose_sampler(args.sampler, dev)
    build_s = time.time() - t0
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    jobs = [(f"p{i}", PROMPTS[i % len(PROMPTS)], k) for i in range(args.prompts) for k in range(args.group_size)]
    plans: dict = {}
    figures = {"levels": {}}
    sample_s = decode_s = 0.0
    tokens = 0
    for level in MODE_LEVELS[args.mode]:
        lv = {"sample_s": 0.0, "decode_s": 0.0, "tokens": 0, "empty_grids": 0, "occupied_mean": 0.0}
        for s in range(0, len(jobs), args.batch_size):
            chunk = jobs[s:s + args.batch_size]
            texts = [build_prompt(p, level, plan=plans.get((pid, k)), fmt=fmt) for pid, p, k in chunk]
            prompt_ids = [encode_text(tok, t) for t in texts]
            seeds = [row_seed(0, pid, k, level) for pid, _, k in chunk]
            t1 = time.time()
            done = sample_fn(model, special, prompt_ids, seeds, codec.seq_len, sampling)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            lv["sample_s"] += time.time() - t1
            lut = special.codec_lookup()
            mesh = []
            for (pid, _, k), d in zip(chunk, done):
                n = d["n_reasoning"]
                plans[(pid, k)] = tok.decode(d["tokens"][:n], skip_special_tokens=True)
                mesh.append(lut[torch.as_tensor(d["tokens"][n + 1:n + 1 + codec.seq_len])].numpy())
                lv["tokens"] += len(d["tokens"])
            mesh = np.stack(mesh)
            assert mesh.shape[1] == codec.seq_len and (mesh >= 0).all()
            t2 = time.time()
            grids = codec.decode_batch(mesh)
            lv["decode_s"] += time.time() - t2
            lv["empty_grids"] += int((grids.reshape(len(grids), -1).max(1) == 0).sum())
            lv["occupied_mean"] += float(grids.reshape(len(grids), -1).mean(1).sum())
        lv["occupied_mean"] /= len(jobs)
        lv["tokens_per_s"] = lv["tokens"] / max(lv["sample_s"], 1e-9)
        figures["levels"][level] = {k: round(v, 4) if isinstance(v, float) else v for k, v in lv.items()}
        print(json.dumps({"level": level, **figures["levels"][level]}), flush=True)
        sample_s += lv["sample_s"]
        decode_s += lv["decode_s"]
        tokens += lv["tokens"]
    figures.update({
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": str(dtype),
        "params": n_params, "vocab_rows": special.vocab_size, **describe_mesh_ids(special),
        "sequences": len(jobs) * len(MODE_LEVELS[args.mode]), "mesh_tokens_per_sequence": codec.seq_len,
        "max_reasoning_tokens": args.max_reasoning_tokens, "batch_size": args.batch_size, "sampler": engine,
        "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k},
        "build_s": round(build_s, 2), "sample_s": round(sample_s, 2), "decode_s": round(decode_s, 2),
        "tokens": tokens, "tokens_per_s": round(tokens / max(sample_s, 1e-9), 1),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2) if dev.type == "cuda" else None,
    })
    if not args.tiny:
        mesh_ids = figures["mesh_code_ids"]
        assert mesh_ids == [[151665, 159856]] and figures["mesh_start_id"] == 159857, mesh_ids
    line = json.dumps(figures)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
