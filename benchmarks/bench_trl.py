"""One flat GRPO iteration of rl3d against TRL's GRPOTrainer on the same model, G and lengths, same run.

Builds a random-init Qwen2 of a named shape with the shipped policy's tokenizer (bench_rl_step's
`random_policy`), then:

- rl3d: the real commands, each timed whole as bench_iteration.sh does: `rl3d synth` (untimed),
  `rl3d gen --mode flat -G G` (sampler auto), `rl3d reward` with the flat preset's geometry terms
  (the cheapest real rewards: no renders, no scorer model), `rl3d rl-step --algo grpo`. Each stage
  is a fresh process, so its seconds include start-up, model loading and (rl-step) the checkpoint.
- TRL: `trl.GRPOTrainer` in this process on the same model dir and the same prompt texts (the
  template rl3d gen wraps them in), num_generations G, max_completion_length = rl3d's mean
  completion length, temperature 1, top-p 0.95, beta and clipping as rl-step's defaults, no vLLM.
  One trainer step = P prompts x G completions and one optimizer update (micro-batch x gradient
  accumulation = P x G, as rl-step's --minibatch 0). Its reward is a Python function (the fraction
  of mesh tokens in the completion): this is a throughput benchmark, not a learning comparison.
  Steps are timed by a callback; the first is a warm-up and not counted when --steps >= 2.

Prints a table of seconds per phase and completion tokens/s end to end, and the ratio rl3d / TRL.

    python benchmarks/bench_trl.py --shape tiny --device cpu --prompts 2 -G 2     # CPU check, minutes
    python benchmarks/bench_trl.py --shape 0.5b --device cuda --prompts 64 -G 8   # the GPU figure

Needs TRL (an optional, benchmark-only dependency): pip install trl datasets
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamed-argument notices, from TRL's code

import torch  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from bench_rl_step import SHAPES, random_policy  # noqa: E402  (benchmarks/ is on the path)
from rl3d.formats.prompts import read_prompts  # noqa: E402
from rl3d.formats.tables import read_table  # noqa: E402
from rl3d.stages.policy.checkpoint import load_codec_for, prompt_format_for, read_policy_meta  # noqa: E402
from rl3d.stages.policy.sequence import build_prompt  # noqa: E402
from rl3d.stages.policy.tokenizer import load_tokenizer, special_ids  # noqa: E402
from rl3d.stages.rewards.reward_config import load_config  # noqa: E402
from rl3d.stages.rl.rl_config import RLConfig  # noqa: E402

# rl-step's defaults, given to TRL too
_RL = RLConfig()
LR, BETA, CLIP_LOW, CLIP_HIGH = _RL.lr, _RL.beta, _RL.clip_low, _RL.clip_high
# the flat preset's render-free terms (its geometry terms, without clip_score and spec), same weights
GEOMETRY_TERMS = {t.name: t.weight for t in load_config("flat").levels["single"] if t.backend == "geometry"}
RL3D_REWARD = "rl3d reward: the flat preset's geometry terms (" + ", ".join(GEOMETRY_TERMS) + "; no renders)"
TRL_REWARD = ("TRL reward: a Python function, the fraction of mesh tokens in the completion "
              "(a throughput benchmark, not a learning comparison)")


# ---- rl3d: the commands of one flat GRPO iteration -------------------------------------------------

def write_reward_config(path: Path) -> Path:
    terms = "".join(f'\n[[levels.single]]\nname = "{t}"\nbackend = "geometry"\nweight = {w}\naggregate = "none"\n'
                    for t, w in GEOMETRY_TERMS.items())
    path.write_text(f'name = "bench-geometry"\ndescription = "render-free geometry terms"\n{terms}')
    return path


def rl3d(*argv: str) -> tuple[float, dict]:
    """Run one rl3d command (--quiet --json) -> (wall seconds, its JSON summary)."""
    cmd = [sys.executable, "-m", "rl3d.cli.main", *argv, "--quiet", "--json"]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - t0
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"bench_trl: `rl3d {' '.join(argv)}` failed with exit code {done.returncode}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def run_rl3d(root: Path, policy: Path, args) -> dict:
    """synth (untimed) -> gen -> reward -> rl-step; seconds per stage, completions and their tokens."""
    rl3d("synth", "--n", str(args.prompts), "--seed", "1001", "--split", "train", "--no-meshes",
         "--out", str(root / "prompts"))
    gen_s, gen = rl3d("gen", "--prompts", str(root / "prompts"), "--policy", str(policy), "--mode", "flat",
                      "-G", str(args.group), "--seed", "1", "--device", args.device, "--out", str(root / "gen"),
                      # no GLBs: TRL writes none, and a random-init model's meshes are noise grids whose
                      # meshing (~190 ms and 4 MB a sample) would dominate the gen command
                      "--no-meshes")
    reward_s, _ = rl3d("reward", "--samples", str(root / "gen"), "--config",
                       str(write_reward_config(root / "reward.toml")), "--out", str(root / "rewards"))
    step_s, step = rl3d("rl-step", "--algo", "grpo", "--policy", str(policy), "--samples", str(root / "gen"),
                        "--rewards", str(root / "rewards"), "--out", str(root / "step1"), "--beta", str(BETA),
                        "--micro-batch", str(args.micro_batch), "--minibatch", "0", "--device", args.device)
    rows = read_table(root / "gen", "samples", columns=["input_ids", "prompt_len"]).to_pylist()
    tokens = sum(len(r["input_ids"]) - r["prompt_len"] for r in rows)
    total = gen_s + reward_s + step_s
    return {"completions": len(rows), "tokens": tokens, "sampler": gen.get("sampler"),
            "gen_s": gen_s, "gen_in_process_s": gen.get("seconds_generate"), "reward_s": reward_s,
            "rl_step_s": step_s, "rl_step_timers": {k: step.get(k) for k in
                                                     ("startup_s", "model_load_s", "ref_s", "update_s", "save_s")},
            "total_s": total, "tok_per_s": tokens / total}


# ---- TRL: GRPOTrainer on the same model and prompts ------------------------------------------------

def prompt_texts(prompts_dir: Path, policy: Path) -> list[str]:
    """The synth prompts wrapped as `rl3d gen --mode flat` wraps them (its level "single")."""
    fmt = prompt_format_for(read_policy_meta(policy), load_tokenizer(policy))
    return [build_prompt(r["prompt"], "single", fmt=fmt) for r in read_prompts(prompts_dir).to_pylist()]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, phases: dict, name: str, device: str):
    """fn, adding its wall seconds (device work included) to phases[name]."""
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        sync(device)
        phases[name] += time.perf_counter() - t0
        return out
    return wrapper


class StepTimer(TrainerCallback):
    """Per optimizer step: wall seconds, the phases timed inside it, completions and their tokens."""

    def __init__(self, phases: dict, device: str):
        self.phases, self.device, self.steps, self.t0 = phases, device, [], 0.0

    def on_step_begin(self, args, state, control, **kw):
        sync(self.device)
        self.phases.update(generate=0.0, generate_and_score=0.0, completions=0, tokens=0)
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        sync(self.device)
        self.steps.append({"step_s": time.perf_counter() - self.t0, **self.phases})


def run_trl(root: Path, policy: Path, texts: list[str], max_completion: int, args) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    cuda = args.device.startswith("cuda")
    tok = AutoTokenizer.from_pretrained(policy, padding_side="left")
    mesh_ids = set(special_ids(load_tokenizer(policy), load_codec_for(policy, read_policy_meta(policy)))
                   .mesh_ids.tolist())
    phases: dict = {}

    def mesh_fraction(completions, completion_ids, **kw) -> list[float]:
        phases["completions"] += len(completion_ids)
        phases["tokens"] += sum(len(c) for c in completion_ids)
        return [sum(t in mesh_ids for t in c) / max(len(c), 1) for c in completion_ids]

    n = len(texts) * args.group
    config = GRPOConfig(
        output_dir=str(root / "trl"), max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=n // args.micro_batch, num_generations=args.group,
        max_completion_length=max_completion, temperature=1.0, top_p=0.95, top_k=0, beta=BETA,
        epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH, loss_type="dapo", scale_rewards="group", num_iterations=1,
        learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=1.0, use_vllm=False,
        activation_checkpointing=False, bf16=cuda, use_cpu=not cuda, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, log_completions=False, seed=0,
        model_init_kwargs={"dtype": torch.bfloat16 if cuda else torch.float32})
    t0 = time.time()
    trainer = GRPOTrainer(model=str(policy), reward_funcs=mesh_fraction, args=config, processing_class=tok,
                          train_dataset=Dataset.from_list([{"prompt": t} for t in texts]))
    build_s = time.time() - t0
    if config.generation_batch_size != n:
        raise SystemExit(f"bench_trl: TRL's generation batch is {config.generation_batch_size}, not {n}")
    trainer._generate = timed(trainer._generate, phases, "generate", args.device)
    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, phases,
                                                    "generate_and_score", args.device)
    timer = StepTimer(phases, args.device)
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict goes to the JSON summary instead
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    counted = timer.steps[1:] if len(timer.steps) > 1 else timer.steps  # the first step warms up

    def mean(key: str) -> float:
        return sum(s[key] for s in counted) / len(counted)

    step_s, gen_s, gas_s, tokens = mean("step_s"), mean("generate"), mean("generate_and_score"), mean("tokens")
    return {"build_s": build_s, "train_s": train_s, "steps": timer.steps, "counted_steps": len(counted),
            "warmup_s": timer.steps[0]["step_s"] if len(timer.steps) > 1 else None,
            "completions": mean("completions"), "tokens": tokens, "max_completion_length": max_completion,
            "generate_s": gen_s, "score_and_ref_s": gas_s - gen_s, "update_s": step_s - gas_s,
            "step_s": step_s, "tok_per_s": tokens / step_s, "trl_metrics": trainer.state.log_history[-1:],
            "gradient_checkpointing": bool(trainer.args.activation_checkpointing), "dtype": str(trainer.model.dtype)}


# ---- the report --------------------------------------------------------------------------------------

def print_report(r: dict, t: dict, args) -> float:
    timers = r["rl_step_timers"]
    startup = (timers["startup_s"] or 0) + (timers["model_load_s"] or 0)
    which = ("one step, warm-up included" if t["warmup_s"] is None else
             "step 2" if args.steps == 2 else f"mean of steps 2..{args.steps}")
    rows = [
        ("rl3d", f"gen (whole command; in-process {r['gen_in_process_s']:.2f} s, sampler {r['sampler']})",
         r["gen_s"], r["tokens"] / r["gen_s"]),
        ("rl3d", "reward (whole command)", r["reward_s"], None),
        ("rl3d", f"rl-step (whole command; start-up + load {startup:.2f}, reference {timers['ref_s']:.2f}, "
                 f"update {timers['update_s']:.2f}, save {timers['save_s']:.2f})", r["rl_step_s"], None),
        ("rl3d", "iteration", r["total_s"], r["tok_per_s"]),
        ("TRL", "trainer built (model + reference load; not counted)", t["build_s"], None),
    ]
    if t["warmup_s"] is not None:
        rows.append(("TRL", "step 1 (warm-up; not counted)", t["warmup_s"], None))
    rows += [("TRL", f"generate ({which})", t["generate_s"], t["tokens"] / t["generate_s"]),
             ("TRL", "rewards + reference log-probs", t["score_and_ref_s"], None),
             ("TRL", "update (loss, backward, optimizer)", t["update_s"], None),
             ("TRL", f"step ({which})", t["step_s"], t["tok_per_s"])]
    print("| side | phase | seconds | completion tok/s |")
    print("|---|---|---:|---:|")
    for side, phase, s, rate in rows:
        print(f"| {side} | {phase} | {s:.2f} | {'' if rate is None else f'{rate:,.0f}'} |")
    ratio = r["tok_per_s"] / t["tok_per_s"]
    print(f"rl3d flat GRPO iteration: {r['completions']} completions, {r['tokens']} completion tokens in "
          f"{r['total_s']:.2f} s = {r['tok_per_s']:,.0f} completion tok/s end to end (gen + reward + rl-step "
          f"commands, start-up, loading and the checkpoint included)")
    print(f"TRL GRPOTrainer: {t['completions']:.0f} completions, {t['tokens']:.0f} completion tokens "
          f"(max_completion_length {t['max_completion_length']}) in {t['step_s']:.2f} s a step = "
          f"{t['tok_per_s']:,.0f} completion tok/s ({which}; in-process, no saving)")
    print(f"ratio rl3d/TRL: {ratio:.2f}")
    return ratio


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "0.5b"], default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=2, help="Prompts P per iteration / TRL step.")
    ap.add_argument("-G", "--group", type=int, default=2, help="Completions per prompt (>= 2, as TRL needs).")
    ap.add_argument("--steps", type=int, default=2, help="TRL steps; with 2 or more the first is a warm-up.")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="Sequences per forward pass, both sides (default: rl-step's 8, at most P x G).")
    ap.add_argument("--keep", type=Path, default=None, metavar="DIR", help="Work in DIR and keep it.")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="Also write a JSON summary.")
    args = ap.parse_args()
    try:
        import datasets  # noqa: F401  (TRL's dataset type)
        import trl
    except ImportError:
        print("bench_trl: TRL is not installed (an optional, benchmark-only dependency); install it with: "
              "pip install trl datasets", file=sys.stderr)
        sys.exit(2)
    n = args.prompts * args.group
    args.micro_batch = args.micro_batch or min(8, n)
    if args.group < 2 or args.prompts < 1 or args.steps < 1 or n % args.micro_batch:
        print(f"bench_trl: need -G >= 2, --prompts >= 1, --steps >= 1 and --micro-batch dividing P x G = {n}",
              file=sys.stderr)
        sys.exit(2)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_trl: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        sys.exit(2)

    hf_logging.disable_progress_bar()  # no weight writing / loading bars between the lines of the report
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        policy, n_params = random_policy(root / "policy", args.shape, None, args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        print(f"# shape {args.shape} ({n_params / 1e6:.1f}M parameters, random init), {args.prompts} prompts x "
              f"G={args.group} = {n} completions a step, micro-batch {args.micro_batch}, one update a step; "
              f"{card}, torch {torch.__version__}, trl {trl.__version__}")
        r = run_rl3d(root, policy, args)
        mean_len = round(r["tokens"] / r["completions"])
        texts = prompt_texts(root / "prompts", policy)
        print(f"# {RL3D_REWARD}\n# {TRL_REWARD}\n# TRL prompts: the {len(texts)} synth prompts in rl3d gen's "
              f"template; TRL samples freely up to max_completion_length = rl3d's mean completion length "
              f"({mean_len}); rl3d's sampler forces the mesh span and the end\n"
              f"# weights: TRL {'bf16' if args.device == 'cuda' else 'fp32'}; rl3d gen bf16 on CUDA, rl-step fp32 "
              f"weights with bf16 autocast on CUDA (fp32 on CPU)")
        t = run_trl(root, policy, texts, mean_len, args)
        ratio = print_report(r, t, args)
        if args.json:
            args.json.write_text(json.dumps({"shape": args.shape, "parameters": n_params, "device": card,
                                             "prompts": args.prompts, "group": args.group,
                                             "micro_batch": args.micro_batch, "rl3d": r, "trl": t,
                                             "ratio": ratio}, indent=2, default=str))


if __name__ == "__main__":
    main()
