"""Benchmark `rl3d rl-step`'s update: tokens/s and MFU of each variant against the baseline, same run.

Builds a random-init Qwen2 of a named shape with the shipped policy's tokenizer (its text and mesh
tokens; `--vocab N` pads the head to N rows), a synthetic but valid Hi-GRPO samples table (per
prompt: G samples x 2 levels, each `--mesh-tokens` mesh tokens after a short random plan) and
rewards with spread, then runs the real rl-step (stages/rl_step.run_rl_step: load, reference
forward, update, checkpoint) once per variant and prints one table:

    variant | tokens/s | MFU | x baseline | ref s | old s | update s | save s | load s | peak GB

tokens = every token of the kept sequences (prompt and completion) per epoch; MFU = 6 N tokens /
update seconds / peak, N = the model's parameters (a tied head counted once). The baseline is the
settings rl-step had before these options: no length buckets, the unfused AdamW, no gradient
checkpointing, the stored log-probs as pi_old, fp32 weights under bf16 autocast (bf16-weights: bf16
weights with fp32 masters in the optimizer; on a CPU it needs --dtype bfloat16, which leaves the
baseline in fp32 there).

    python benchmarks/bench_rl_step.py --shape tiny                  # CPU check, well under a minute
    python benchmarks/bench_rl_step.py --shape 0.5b --device cuda    # G=8 x 2 levels x 1024 mesh tokens
    python benchmarks/bench_rl_step.py --shape 1.5b --device cuda --prompts 32 \\
        --variants baseline,buckets+fused,buckets+fused+ckpt
    python benchmarks/bench_rl_step.py --shape 0.5b --device cuda --prompts 16 \\
        --variants baseline,bf16-weights,buckets+fused,buckets+fused+bf16-weights
    python benchmarks/bench_rl_step.py --shape 0.5b --device cuda --prompts 16 \\
        --variants baseline,left-padded          # right-padded batches (no mask: flash) against the old layout

Defaults per shape: tiny = 1 prompt, 128 mesh tokens, micro-batch 4, minibatch 8; 0.5b and 1.5b =
64 prompts (1,024 sequences), 1,024 mesh tokens, micro-batch 32, minibatch 256.
"""
from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from accelerate.state import AcceleratorState

from rl3d.formats import shards, tables
from rl3d.formats.errors import InputError
from rl3d.stages.contract import Progress
from rl3d.stages.policy.checkpoint import default_policy_dir, load_codec_for, read_policy_meta, save_policy
from rl3d.stages.policy.tokenizer import load_tokenizer, special_ids
from rl3d.stages.rl.rl_config import RLConfig
from rl3d.stages.rl_step import run_rl_step

# (hidden, layers, heads, kv heads, intermediate); 0.5b and 1.5b are Qwen2.5-0.5B / 1.5B's decoders
SHAPES = {"tiny": (64, 2, 4, 2, 176), "0.5b": (896, 24, 14, 2, 4864), "1.5b": (1536, 28, 12, 2, 8960),
          "7b": (3584, 28, 28, 4, 18944)}
DEFAULTS = {"tiny": {"prompts": 1, "mesh_tokens": 128, "micro_batch": 4, "minibatch": 8},
            "0.5b": {"prompts": 64, "mesh_tokens": 1024, "micro_batch": 32, "minibatch": 256},
            "1.5b": {"prompts": 64, "mesh_tokens": 1024, "micro_batch": 32, "minibatch": 256},
            "7b": {"prompts": 4, "mesh_tokens": 1024, "micro_batch": 8, "minibatch": 64}}
LEFT_PADDED = "left_padded"
# variant name -> the RLConfig settings it changes from the baseline
VARIANTS = {
    "baseline": {},
    "buckets": {"length_buckets": True},
    "fused": {"fused_adamw": True},
    "buckets+fused": {"length_buckets": True, "fused_adamw": True},
    "buckets+fused+ckpt": {"length_buckets": True, "fused_adamw": True, "gradient_checkpointing": True},
    "buckets+fused+recompute": {"length_buckets": True, "fused_adamw": True, "old_logprobs": "recompute"},
    "bf16-weights": {"bf16_weights": True},
    # the update's batches as they were before right padding: prompts left-padded, so every forward
    # carries a padding mask (memory-efficient attention instead of flash); not an RLConfig setting
    "left-padded": {LEFT_PADDED: True},
    "buckets+fused+bf16-weights": {"length_buckets": True, "fused_adamw": True, "bf16_weights": True},
}
BASELINE = {"length_buckets": False, "fused_adamw": False, "gradient_checkpointing": False, "old_logprobs": "stored",
            "bf16_weights": False}


def random_policy(out: Path, shape: str, vocab: int | None, device: str) -> tuple[Path, int]:
    """A random-init Qwen2 of `shape` with the shipped policy's tokenizer and codec -> (dir, params)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src = default_policy_dir()
    tok = load_tokenizer(src)
    codec = load_codec_for(src, read_policy_meta(src))
    hidden, layers, heads, kv, inter = SHAPES[shape]
    V = vocab or len(tok)
    if V < len(tok):
        raise SystemExit(f"--vocab {V}: the tokenizer alone has {len(tok)} tokens")
    cfg = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=V, max_position_embeddings=4096,
                      tie_word_embeddings=shape != "7b", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    if shape == "7b":  # saved in bf16 (15 GB, as a real 7B checkpoint), not fp32
        torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # initialising 1.5B weights on the CPU alone takes a while
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    n_params = sum(p.numel() for p in model.parameters())  # unique: a tied head once
    save_policy(out, model, tok, codec, step=0, base="random-init")
    del model
    return out, n_params


def synthetic_batch(policy_dir: Path, root: Path, prompts: int, group: int, mesh_tokens: int,
                    max_reasoning: int, seed: int = 0) -> list[dict]:
    """A Hi-GRPO samples table and a rewards table as gen and reward write them (provenance
    included). Per prompt and sample: a coarse row (prompt 24-47 tokens, a plan of 8..max_reasoning
    tokens, <mesh-start>, mesh tokens, <mesh-end>, eos) and a fine row whose prompt also carries the plan."""
    from rl3d.stages.policy.checkpoint import policy_id

    tok = load_tokenizer(policy_dir)
    meta = read_policy_meta(policy_dir)
    codec = load_codec_for(policy_dir, meta)
    special = special_ids(tok, codec)
    pid = policy_id(policy_dir.resolve(), meta)
    rng = np.random.default_rng(seed)
    text = special.text_ids.numpy()
    rows = []
    for p in range(prompts):
        prompt = rng.choice(text, int(rng.integers(24, 48))).tolist()
        for k in range(group):
            plan = rng.choice(text, int(rng.integers(8, max_reasoning + 1))).tolist()
            for level, head in (("coarse", prompt), ("fine", prompt + rng.choice(text, 30).tolist() + plan)):
                own = rng.choice(text, int(rng.integers(8, max_reasoning + 1))).tolist()
                reasoning = plan if level == "coarse" else own
                codes = rng.integers(0, special.k, mesh_tokens)
                tail = [special.mesh_start, *special.mesh_ids[codes].tolist(), special.mesh_end, special.eos]
                n_choice = len(reasoning) + 1 + mesh_tokens  # forced <mesh-end> and eos have log-prob 0
                lps = np.concatenate([rng.uniform(-2.0, -0.01, n_choice), np.zeros(2)]).astype(np.float32)
                P, R = len(head), len(reasoning)
                rows.append({"sample_id": f"p{p}-{k}-{level}", "prompt_id": f"p{p}", "sample_index": k,
                             "level": level, "prompt": f"prompt {p}", "input_ids": head + reasoning + tail,
                             "prompt_len": P, "reasoning_start": P, "reasoning_end": P + R, "mesh_start": P + R + 1,
                             "mesh_end": P + R + 1 + mesh_tokens, "logprobs": lps.tolist(), "reasoning": "",
                             "mesh_tokens": codes.astype(np.int32).tolist(), "reasoning_truncated": False,
                             "status": "ok", "message": "", "mesh_path": None, "policy_id": pid, "policy_step": 0,
                             "seed": seed, "temperature": 1.0})
    gen_config = {"bench": "synthetic", "seed": seed}
    shards.write_part(tables.with_metadata(pa.Table.from_pylist(rows), "samples", gen_config, pid), root / "gen",
                      shards.Shard(0, 1))
    rewards = pa.table({"sample_id": [r["sample_id"] for r in rows], "prompt_id": [r["prompt_id"] for r in rows],
                        "sample_index": pa.array([r["sample_index"] for r in rows], pa.int32()),
                        "level": [r["level"] for r in rows], "total": rng.normal(0.0, 1.0, len(rows)),
                        "status": ["ok"] * len(rows), "message": [""] * len(rows)})
    made_from = {"samples": tables.table_id("samples", gen_config, pid)}
    shards.write_part(tables.with_metadata(rewards, "rewards", {"reward": "synthetic"}, pid, made_from),
                      root / "rewards", shards.Shard(0, 1))
    return rows


def run_variant(name: str, policy_dir: Path, root: Path, args, settings: dict) -> dict:
    """One rl-step with the variant's settings; its timers, and the peak GPU memory."""
    settings = dict(settings)
    left_padded = settings.pop(LEFT_PADDED, False)
    cfg = RLConfig(**{**BASELINE, **settings}, micro_batch=args.micro_batch, minibatch=args.minibatch,
                   beta=args.beta, lr=1e-6, seed=0)
    out = root / f"out-{name}"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    # accelerate keeps one mixed-precision setting a process; a variant starts as its own rl-step
    # process would (on a CPU, bf16-weights computes in bf16 and the baseline in fp32)
    AcceleratorState._reset_state(reset_partial_state=True)
    from rl3d.stages.rl import update
    collate = update.collate
    if left_padded:
        update.collate = lambda rows, special, device=None, right_padded=False: collate(rows, special, device)
    try:
        s = run_rl_step(policy_dir, root / "gen", root / "rewards", out, cfg,
                        run_metrics=str(root / "metrics.parquet"), device=args.device, dtype=args.dtype,
                        overwrite=True, allow_off_policy=True, progress=Progress(quiet=True),
                        lora_rank=args.lora_rank)
    except torch.OutOfMemoryError:  # a row of the table, not the end of the run (e.g. 1.5b without ckpt)
        s = {"oom": True}
    except InputError as e:  # a variant this device and dtype cannot run (bf16-weights on a CPU in fp32)
        s = {"refused": str(e)}
    finally:
        update.collate = collate
    s["command_s"] = time.time() - t0
    s["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    shutil.rmtree(out, ignore_errors=True)  # 1.5B: 18 GB of weights and optimizer state per variant
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--vocab", type=int, default=None, help="Head rows (default: the shipped tokenizer's size).")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--mesh-tokens", type=int, default=None)
    ap.add_argument("--max-reasoning", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--minibatch", type=int, default=None)
    ap.add_argument("--beta", type=float, default=0.01, help="0 skips the reference forward.")
    ap.add_argument("--lora-rank", type=int, default=0, help="rl-step --lora-rank (0 = full fine-tune)")
    ap.add_argument("--device", default=None, help="cuda if available, else cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="rl-step's --dtype (default: bf16 autocast on CUDA, fp32 on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="Dense bf16 peak of the card (989 for H100 / H200 SXM).")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated, of: {', '.join(VARIANTS)}.")
    ap.add_argument("--no-warmup", action="store_true", help="Skip the untimed first step (CUDA / kernel warm-up).")
    ap.add_argument("--profile", default=None, metavar="VARIANT",
                    help="Run this variant once more under torch.profiler (after the table) and print its top "
                         "kernels by device time, to see what limits the update.")
    args = ap.parse_args()
    for k, v in DEFAULTS[args.shape].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(unknown)} (expected {', '.join(VARIANTS)})")
    if "baseline" not in names:
        names.insert(0, "baseline")

    with tempfile.TemporaryDirectory(prefix="bench_rl_step_") as tmp:
        root = Path(tmp)
        t0 = time.time()
        policy_dir, n_params = random_policy(root / "policy", args.shape, args.vocab, args.device)
        rows = synthetic_batch(policy_dir, root, args.prompts, args.group, args.mesh_tokens, args.max_reasoning)
        tokens = sum(len(r["input_ids"]) for r in rows)
        build_s = time.time() - t0
        print(f"# shape {args.shape}: {n_params / 1e6:.1f}M parameters, vocab {args.vocab or 'tokenizer'}; "
              f"{len(rows)} sequences ({args.prompts} prompts x G={args.group} x 2 levels, {args.mesh_tokens} mesh "
              f"tokens), {tokens} tokens; micro-batch {args.micro_batch}, minibatch {args.minibatch}; "
              f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}), "
              f"torch {torch.__version__}; built in {build_s:.1f}s")
        if not args.no_warmup:  # one prompt's rows: kernels, allocator and caches warm before the timed runs
            synthetic_batch(policy_dir, root / "warmup", 1, args.group, args.mesh_tokens, args.max_reasoning)
            run_variant("warmup", policy_dir, root / "warmup", args, {})
        results = {n: run_variant(n, policy_dir, root, args, VARIANTS[n]) for n in names}
        print_table(results, tokens, n_params, args.peak_tflops)
        if args.profile:
            profile_variant(args.profile, policy_dir, root, args)


def profile_variant(name: str, policy_dir: Path, root: Path, args) -> None:
    """The variant's whole rl-step under torch.profiler: the top 25 operators by self device time."""
    from torch.profiler import ProfilerActivity, profile

    if name not in VARIANTS:
        raise SystemExit(f"--profile {name}: not a variant ({', '.join(VARIANTS)})")
    cuda = torch.cuda.is_available() and str(args.device).startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run_variant(f"profile-{name}", policy_dir, root, args, VARIANTS[name])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"# profile of {name}, by {sort}")
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60))


def print_table(results: dict, tokens: int, n_params: int, peak_tflops: float) -> None:
    """One row per variant; "x baseline" is the update's tokens/s against the baseline's, same run."""
    base = results["baseline"]
    base_tps = None if base.get("oom") or base.get("refused") else tokens / max(base["update_s"], 1e-9)
    print("| variant | tokens/s | MFU | x baseline | ref s | old s | update s | save s | load s | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, s in results.items():
        if s.get("oom"):
            print(f"| {n} | out of memory | | | | | | | | {s['peak_gb']:.1f} |")
            continue
        if s.get("refused"):
            print(f"| {n} | not run: {s['refused']} | | | | | | | | |")
            continue
        tps = tokens / max(s["update_s"], 1e-9)
        mfu = 6 * n_params * tps / (peak_tflops * 1e12)
        ratio = f"{tps / base_tps:.2f}" if base_tps else "n/a"
        print(f"| {n} | {tps:,.0f} | {mfu:.1%} | {ratio} | {s['ref_s']:.2f} | {s['old_s']:.2f} | "
              f"{s['update_s']:.2f} | {s['save_s']:.2f} | {s['load_s'] + s['model_load_s']:.2f} | "
              f"{s['peak_gb']:.1f} |")


if __name__ == "__main__":
    main()
