"""`rl3d train --lora-rank 16` at ShapeLLM-Omni's 7B shape on one GPU: seconds a step, memory, checkpoints.

Builds a random-init policy directory of the published shape (nothing downloaded):
Qwen2_5_VLForConditionalGeneration with Qwen2.5-VL-7B's text config and vision tower in bf16, the
159,859-row vocabulary laid out as ShapeLLM-Omni's (mesh ids 151665..159856, then <mesh-start>,
<mesh-end>; examples/qwenvl_7b_gen.py), the 64^3 VQ-VAE at the published size with random weights as
its codec, and an rl3d_policy.json naming them. Then runs the real command on it,

    rl3d train --prompts synth --policy P --lora-rank 16 --gradient-checkpointing --steps N ...

and prints seconds a step (each phase), peak GPU memory (sampled with nvidia-smi), and what each
checkpoint holds on disk: a LoRA run writes the adapter and its optimizer state every step, and a
merged 15 GB policy only at the last step.

    python benchmarks/bench_train_7b.py                              # 7B shape, 10 steps (a GPU)
    python benchmarks/bench_train_7b.py --tiny --device cpu --steps 2  # the same path at toy size
    python benchmarks/bench_train_7b.py --steps 6 --overlap 1          # sampling beside the scoring
    python benchmarks/bench_train_7b.py --lora-rank 0 --steps 3 \\
        --launch "accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 4"  # full FT, FSDP
    python benchmarks/bench_train_7b.py --tiny --device cpu --lora-rank 0 --steps 2 \\
        --launch "torchrun --standalone --nproc_per_node 2"         # the launched path at toy size (DDP, gloo)

Under --launch, rollouts are split over the processes as rl3d train splits them; the figures are
per GPU (peak memory of each card) and the update's tokens/s a GPU with its model FLOPs utilisation:
6 x trained parameters a token for full fine-tuning, 4 x for LoRA (no gradient of the frozen
weights), recomputation under activation checkpointing not counted, over --peak-tflops a GPU.

A random-init policy never picks <mesh-start> by itself, so each sequence spends the whole reasoning
budget, then the 1,024 mesh tokens the codec needs: every step samples the longest sequences it can.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))  # the 7B shape and tokenizer layout of qwenvl_7b_gen.py

import torch  # noqa: E402
from qwenvl_7b_gen import QWEN_TEXT_IDS, TEXT_7B, TEXT_TINY, VISION_7B, VISION_TINY, qwen_layout_tokenizer  # noqa: E402

from rl3d.formats.vqvae64 import VQVAE64Config  # noqa: E402
from rl3d.stages.codecs.vqvae64 import VQVAE3D, VQVAE64Codec, make_block_replica  # noqa: E402
from rl3d.stages.policy.checkpoint import POLICY_META  # noqa: E402


def build_policy(out: Path, tiny: bool, device: str) -> dict:
    """A random-init policy dir of the 7B shape (or a toy one): weights in bf16 on CUDA."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    t0 = time.time()
    n_text, n_mesh = (300, 16) if tiny else (QWEN_TEXT_IDS, 8192)
    tok = qwen_layout_tokenizer(n_text, n_mesh)
    text, vision = (TEXT_TINY, VISION_TINY) if tiny else (TEXT_7B, VISION_7B)
    cfg = Qwen2_5_VLConfig(text_config=dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id, bos_token_id=None, **text),
                           vision_config=vision)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    torch.set_default_dtype(torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    codec = VQVAE64Codec(make_block_replica() if tiny else VQVAE3D(VQVAE64Config()))
    codec.save(out / "codec")
    codec = VQVAE64Codec.load(out / "codec")
    meta = {"model_class": "Qwen2_5_VLForConditionalGeneration", "codec": "codec",
            "codec_hash": codec.content_hash(), "chat_template": True, "sampling": "shapellm", "step": 0,
            "base": "random-init Qwen2.5-VL-7B shape (benchmarks/bench_train_7b.py)"}
    (out / POLICY_META).write_text(json.dumps(meta))
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"parameters": n_params, "vocab_rows": len(tok), "build_s": round(time.time() - t0, 1),
            "policy_gb": round(dir_bytes(out) / 1e9, 2)}


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


class GpuMemory:
    """Peak used memory of each GPU as nvidia-smi reports it (every process on the card), sampled."""

    def __init__(self, period_s: float = 0.5):
        self.peak_mib: dict[int, int] = {}
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                for line in out.strip().splitlines():
                    i, used = (int(x) for x in line.split(","))
                    self.peak_mib[i] = max(self.peak_mib.get(i, 0), used)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            self._stop.wait(self.period_s)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def update_figures(run: Path, trained_params: int, lora: bool, gpus: int, peak_tflops: float) -> list[dict]:
    """Per trained step: the update's seconds, the tokens its forward and backward passes took (the
    kept samples' whole sequences), tokens/s a GPU and model FLOPs utilisation."""
    import pyarrow.parquet as pq

    from rl3d.stages.scoring.run_metrics import read_run_metrics

    metrics = {name: dict(zip(*curve)) for name, curve in read_run_metrics(run / "metrics.parquet").items()}
    flops_per_token = (4 if lora else 6) * trained_params
    out = []
    for step, update_s in sorted(metrics.get("update_s", {}).items()):
        gen = run / f"step-{int(step):06d}" / "gen"
        lengths = [len(ids) for f in sorted(gen.glob("part-*.parquet"))
                   for ids in pq.read_table(f, columns=["input_ids"]).column("input_ids").to_pylist()]
        if not lengths or not update_s:
            continue
        tokens = sum(lengths) * metrics.get("kept_samples", {}).get(step, len(lengths)) / len(lengths)
        per_gpu = tokens / update_s / gpus
        out.append({"step": int(step), "update_s": round(update_s, 2), "sequence_tokens": int(tokens),
                    "tokens_per_s_per_gpu": round(per_gpu, 1),
                    "mfu": round(per_gpu * flops_per_token / (peak_tflops * 1e12), 4)})
    return out


def checkpoints(run: Path) -> list[dict]:
    """What each kept checkpoint holds: its files and their size."""
    out = []
    for c in sorted((run / "checkpoints").glob("step-*")):
        files = sorted(str(f.relative_to(c)) for f in c.rglob("*") if f.is_file())
        out.append({"checkpoint": c.name, "mb": round(dir_bytes(c) / 1e6, 1),
                    "merged_policy": any(f.endswith(".safetensors") and not f.startswith("adapter") for f in files),
                    "files": files})
    return out


def processes_of(launcher: list[str]) -> int:
    """The process count a launcher command line asks for (1 without one)."""
    for flag in ("--num_processes", "--nproc_per_node", "--nproc-per-node"):
        if flag in launcher:
            return int(launcher[launcher.index(flag) + 1])
        for word in launcher:
            if word.startswith(flag + "="):
                return int(word.split("=", 1)[1])
    return 1


def train_summary(stdout: str) -> dict:
    """rl3d train's --json summary: the main process's line (launched processes share stdout)."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(d, dict) and d.get("stage") == "train":
            return d
    raise SystemExit("rl3d train printed no summary line")


def trained_parameters(policy: Path) -> int:
    """Parameters whose FLOPs count: the language model's (the vision tower is frozen and sees no
    image in a text-only run); with LoRA the frozen base still computes every product."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(policy)
    text = getattr(cfg, "text_config", None) or cfg
    h, inner, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    heads, kv = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    return layers * (attention + 3 * h * inner) + text.vocab_size * h  # the head; embeddings are lookups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="toy sizes (a CPU check of the same path)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=2, help="prompts a step (fresh synth prompts each step)")
    ap.add_argument("-G", "--group-size", type=int, default=4)
    ap.add_argument("--mode", default="hi-grpo", choices=["hi-grpo", "flat"])
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--max-reasoning-tokens", type=int, default=32)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--overlap", type=int, default=0, choices=[0, 1], help="rl3d train --overlap")
    ap.add_argument("--profile-step", type=int, default=0, help="rl3d train --profile-step (RUN/profile; with --keep)")
    ap.add_argument("--launch", default=None,
                    help='a multi-process launcher for rl3d train, e.g. "accelerate launch --config_file '
                         'examples/accelerate/fsdp.yaml --num_processes 4" or "torchrun --standalone --nproc_per_node 2"')
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="a GPU's dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the policy and the run in this folder")
    ap.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    a = ap.parse_args()
    root = a.keep or Path(tempfile.mkdtemp(prefix="bench-train-7b-"))
    root.mkdir(parents=True, exist_ok=True)
    res: dict = {"settings": {k: str(v) for k, v in vars(a).items()},
                 "device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu"}
    policy = root / "policy"
    if not (policy / POLICY_META).exists():
        res["policy"] = build_policy(policy, a.tiny, a.device)
        print(f"policy: {json.dumps(res['policy'])}", file=sys.stderr, flush=True)
    run = root / "run"
    launcher = shlex.split(a.launch) if a.launch else [sys.executable]
    gpus = processes_of(launcher)
    argv = [*launcher, "-m", "rl3d.cli.main", "train", "--prompts", "synth", "--policy", str(policy),
            "--out", str(run), "--steps", str(a.steps), "--prompts-per-step", str(a.prompts),
            "-G", str(a.group_size), "--mode", a.mode, "--lora-rank", str(a.lora_rank), "--gradient-checkpointing",
            "--micro-batch", str(a.micro_batch), "--max-reasoning-tokens", str(a.max_reasoning_tokens),
            "--views", str(a.views), "--resolution", str(a.resolution), "--save-every", "1", "--lr", "1e-5",
            "--device", a.device, "--overlap", str(a.overlap), "--profile-step", str(a.profile_step), "--json"]
    print("$ " + " ".join(argv), file=sys.stderr, flush=True)
    t0 = time.time()
    with GpuMemory() as mem:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    res["wall_s"] = round(time.time() - t0, 1)
    if proc.returncode != 0:
        print(f"rl3d train failed (exit {proc.returncode})", file=sys.stderr)
        sys.exit(proc.returncode)
    summary = train_summary(proc.stdout)
    res["train"] = summary
    res["processes"] = gpus
    res["peak_gpu_mib"] = mem.peak_mib or None
    res["checkpoints"] = checkpoints(run)
    res["update"] = update_figures(run, trained_parameters(policy), a.lora_rank > 0, gpus, a.peak_tflops)
    print(json.dumps({k: summary.get(k) for k in ("steps", "seconds_per_step", "steady_seconds_per_step",
                                                   "phase_seconds")}))
    print(f"{a.steps} steps in {res['wall_s']} s (model loading included), {gpus} process(es); peak GPU memory "
          f"{res['peak_gpu_mib']} MiB ({res['device']})")
    for u in res["update"]:
        print(f"  update of step {u['step']}: {u['update_s']} s, {u['sequence_tokens']} tokens, "
              f"{u['tokens_per_s_per_gpu']} tokens/s a GPU, MFU {100 * u['mfu']:.1f}% of {a.peak_tflops:g} TFLOP/s")
    for c in res["checkpoints"]:
        print(f"  {c['checkpoint']}: {c['mb']} MB, merged policy {'yes' if c['merged_policy'] else 'no'}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2, default=str))
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
