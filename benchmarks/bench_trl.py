"""Flat GRPO iterations of rl3d against TRL's GRPOTrainer on the same model, G and lengths, same run.

Builds a random-init Qwen2 of a named shape with the shipped policy's tokenizer (bench_rl_step's
`random_policy`) and synth prompts (`rl3d synth`, untimed), then times three arms:

- rl3d commands (--skip-commands leaves it out): one iteration as bench_iteration.sh runs it, each
  command timed whole: `rl3d gen --mode flat -G G --no-meshes` (sampler auto), `rl3d reward` with
  the flat preset's geometry terms (the cheapest real rewards: no renders, no scorer model),
  `rl3d rl-step --algo grpo`. Each stage is a fresh process, so its seconds include start-up,
  model loading and (rl-step) the checkpoint.
- rl3d train (--skip-train leaves it out): the resident loop, `rl3d train --mode flat` (GRPO) for
  --steps steps on the same policy and prompts (--prompts-per-step P: all of them every step), the
  same G, reward TOML, micro-batch, beta and --minibatch 0. Its warm step is the mean of steps
  2..N of the command's own step timing (`steady_seconds_per_step` of its --json summary; the
  per-phase seconds are its `phase_seconds`), and each step's completion tokens are counted in
  RUN/step-NNNNNN/gen's samples table. It runs with --no-meshes, as the commands' gen does: no
  GLBs and no render stage (the geometry terms read the voxel grid the tokens decode to). Model loading and the final checkpoint (--save-every = --steps) fall outside the steps.
- TRL (--skip-trl leaves it out): `trl.GRPOTrainer` in this process on the same model dir and the
  same prompt texts (the template rl3d gen wraps them in), num_generations G,
  max_completion_length = rl3d's mean completion length (the commands' sample, else the train
  run's), temperature 1, top-p 0.95, beta and clipping as rl-step's defaults, no vLLM. One trainer
  step = P prompts x G completions and one optimizer update (micro-batch x gradient accumulation
  = P x G, as rl-step's --minibatch 0). Its reward is a Python function (the fraction of mesh
  tokens in the completion): this is a throughput benchmark, not a learning comparison. Steps are
  timed by a callback; the first is a warm-up and not counted when --steps >= 2.

Prints a table of seconds per phase and completion tokens/s, and the ratios rl3d commands / TRL
(cold commands against TRL's warm step) and rl3d train / TRL (warm step against warm step, the
figure of the 0.5B goal: >= 1.5).

    python benchmarks/bench_trl.py --shape tiny --device cpu --prompts 2 -G 2     # CPU check, minutes
    python benchmarks/bench_trl.py --shape 0.5b --device cuda --prompts 64 -G 8 --skip-commands  # the GPU figure

Needs TRL for its arm (an optional, benchmark-only dependency): pip install trl datasets
"""
from __future__ import annotations

import argparse
import dataclasses
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
    """gen -> reward -> rl-step on root/prompts; seconds per stage, completions and their tokens."""
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


# ---- rl3d train: the resident loop on the same policy, prompts and rewards ------------------------

def run_train(root: Path, policy: Path, args) -> dict:
    """`rl3d train --mode flat` for --steps steps; seconds per step and phase from its --json summary,
    completion tokens per step from each step's samples table."""
    run = root / "train"
    _, out = rl3d("train", "--prompts", str(root / "prompts"), "--policy", str(policy), "--out", str(run),
                  "--mode", "flat", "--steps", str(args.steps), "--prompts-per-step", str(args.prompts),
                  "-G", str(args.group), "--rewards", str(write_reward_config(root / "reward.toml")),
                  "--no-meshes",
                  "--beta", str(BETA), "--micro-batch", str(args.micro_batch), "--minibatch", "0",
                  "--save-every", str(args.steps), "--keep-checkpoints", "1", "--device", args.device)
    phases = out["phase_seconds"]  # phase -> seconds of each step, in step order
    steps = []
    for i in range(out["steps_run"]):
        rows = read_table(run / f"step-{i + 1:06d}" / "gen", "samples",
                          columns=["input_ids", "prompt_len"]).to_pylist()
        steps.append({"step": i + 1, "completions": len(rows),
                      "tokens": sum(len(r["input_ids"]) - r["prompt_len"] for r in rows),
                      **{k: v[i] for k, v in phases.items()}, "phases_s": sum(v[i] for v in phases.values())})
    warm = steps[1:] or steps  # the first step warms up (allocator, kernels, the worker pools' first jobs)
    step_s = out["steady_seconds_per_step"] or out["seconds_per_step"]  # the loop's own wall seconds a step

    def mean(key: str) -> float:
        return sum(s[key] for s in warm) / len(warm)

    tokens = mean("tokens")
    return {"steps": steps, "counted_steps": len(warm), "warmup_s": steps[0]["phases_s"] if len(steps) > 1 else None,
            "model_load_s": out["model_load_s"], "run_s": out["seconds"], "completions": mean("completions"),
            "tokens": tokens, "phase_s": {k: mean(k) for k in phases}, "step_s": step_s,
            "tok_per_s": tokens / step_s, "meshes": False}


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
    # transformers renamed the field (gradient_checkpointing before 5.2x, activation_checkpointing after)
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    no_checkpointing = {next(k for k in ("activation_checkpointing", "gradient_checkpointing") if k in fields): False}
    config = GRPOConfig(
        output_dir=str(root / "trl"), max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=n // args.micro_batch, num_generations=args.group,
        max_completion_length=max_completion, temperature=1.0, top_p=0.95, top_k=0, beta=BETA,
        epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH, loss_type="dapo", scale_rewards="group", num_iterations=1,
        learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=1.0, use_vllm=False,
        **no_checkpointing, bf16=cuda, use_cpu=not cuda, report_to="none", save_strategy="no",
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
            "gradient_checkpointing": bool(getattr(trainer.args, next(iter(no_checkpointing)))),
            "dtype": str(trainer.model.dtype)}


# ---- the report --------------------------------------------------------------------------------------

def counted(steps: int, warmup: bool) -> str:
    """Which steps a warm figure averages."""
    return "one step, warm-up included" if not warmup else "step 2" if steps == 2 else f"mean of steps 2..{steps}"


def print_report(r: dict | None, tr: dict | None, t: dict | None, args) -> dict:
    """The table and the summary lines; returns the ratios (None where an arm was skipped)."""
    rows = []
    if r:
        timers = r["rl_step_timers"]
        startup = (timers["startup_s"] or 0) + (timers["model_load_s"] or 0)
        rows += [
            ("rl3d commands", f"gen (whole command; in-process {r['gen_in_process_s']:.2f} s, sampler "
                              f"{r['sampler']}, no GLBs)", r["gen_s"], r["tokens"] / r["gen_s"]),
            ("rl3d commands", "reward (whole command)", r["reward_s"], None),
            ("rl3d commands", f"rl-step (whole command; start-up + load {startup:.2f}, reference "
                              f"{timers['ref_s']:.2f}, update {timers['update_s']:.2f}, save {timers['save_s']:.2f})",
             r["rl_step_s"], None),
            ("rl3d commands", "iteration (cold)", r["total_s"], r["tok_per_s"])]
    if tr:
        which = counted(args.steps, tr["warmup_s"] is not None)
        ph = tr["phase_s"]
        rows.append(("rl3d train", "models loaded (not counted)", tr["model_load_s"], None))
        if tr["warmup_s"] is not None:
            rows.append(("rl3d train", "step 1 (warm-up; not counted)", tr["warmup_s"], None))
        rows += [("rl3d train", f"gen ({which}; --no-meshes)", ph["gen"],
                  tr["tokens"] / ph["gen"] if ph.get("gen") else None),
                 ("rl3d train", "reward", ph.get("reward", 0.0), None),
                 ("rl3d train", "update (reference, loss, backward, optimizer; + prompts, weight sync)",
                  ph.get("update", 0.0) + ph.get("prompts", 0.0) + ph.get("sync", 0.0), None),
                 ("rl3d train", f"step ({which}; the loop's own step timing)", tr["step_s"], tr["tok_per_s"])]
    if t:
        which = counted(args.steps, t["warmup_s"] is not None)
        rows.append(("TRL", "trainer built (model + reference load; not counted)", t["build_s"], None))
        if t["warmup_s"] is not None:
            rows.append(("TRL", "step 1 (warm-up; not counted)", t["warmup_s"], None))
        rows += [("TRL", f"generate ({which})", t["generate_s"], t["tokens"] / t["generate_s"]),
                 ("TRL", "rewards + reference log-probs", t["score_and_ref_s"], None),
                 ("TRL", "update (loss, backward, optimizer)", t["update_s"], None),
                 ("TRL", f"step ({which})", t["step_s"], t["tok_per_s"])]
    print("| side | phase | seconds | completion tok/s |")
    print("|---|---|---:|---:|")
    for side, phase, sec, rate in rows:
        print(f"| {side} | {phase} | {sec:.2f} | {'' if rate is None else f'{rate:,.0f}'} |")
    if r:
        print(f"rl3d commands, one flat GRPO iteration: {r['completions']} completions, {r['tokens']} completion "
              f"tokens in {r['total_s']:.2f} s = {r['tok_per_s']:,.0f} completion tok/s end to end (gen + reward + "
              f"rl-step commands, start-up, loading and the checkpoint included)")
    if tr:
        print(f"rl3d train --mode flat: {tr['completions']:.0f} completions, {tr['tokens']:.0f} completion tokens "
              f"in {tr['step_s']:.2f} s a step = {tr['tok_per_s']:,.0f} completion tok/s "
              f"({counted(args.steps, tr['warmup_s'] is not None)}; loading and the final checkpoint not "
              f"included)")
    if t:
        print(f"TRL GRPOTrainer: {t['completions']:.0f} completions, {t['tokens']:.0f} completion tokens "
              f"(max_completion_length {t['max_completion_length']}) in {t['step_s']:.2f} s a step = "
              f"{t['tok_per_s']:,.0f} completion tok/s ({counted(args.steps, t['warmup_s'] is not None)}; "
              f"in-process, no saving)")
    ratios = {"commands_over_trl": r["tok_per_s"] / t["tok_per_s"] if r and t else None,
              "train_over_trl": tr["tok_per_s"] / t["tok_per_s"] if tr and t else None}
    if ratios["commands_over_trl"] is not None:
        print(f"ratio rl3d commands / TRL (completion tok/s, cold commands against TRL's warm step): "
              f"{ratios['commands_over_trl']:.2f}")
    if ratios["train_over_trl"] is not None:
        print(f"ratio rl3d train / TRL (completion tok/s, warm step against warm step; the 0.5B goal is >= 1.5): "
              f"{ratios['train_over_trl']:.2f}")
    return ratios


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["tiny", "0.5b"], default="tiny")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=2, help="Prompts P per iteration / step.")
    ap.add_argument("-G", "--group", type=int, default=2, help="Completions per prompt (>= 2, as TRL needs).")
    ap.add_argument("--steps", type=int, default=3,
                    help="Steps of rl3d train and of TRL; with 2 or more the first is a warm-up and not counted.")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="Sequences per forward pass, every arm (default: rl-step's 8, at most P x G).")
    ap.add_argument("--skip-commands", action="store_true", help="Leave out the arm of single rl3d commands.")
    ap.add_argument("--skip-train", action="store_true", help="Leave out the rl3d train arm.")
    ap.add_argument("--skip-trl", action="store_true", help="Leave out the TRL arm (no trl / datasets needed).")
    ap.add_argument("--keep", type=Path, default=None, metavar="DIR", help="Work in DIR and keep it.")
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="Also write a JSON summary.")
    args = ap.parse_args()
    trl_version = None
    if not args.skip_trl:
        try:
            import datasets  # noqa: F401  (TRL's dataset type)
            import trl
        except ImportError:
            print("bench_trl: TRL is not installed (an optional, benchmark-only dependency); install it with: "
                  "pip install trl datasets, or leave its arm out with --skip-trl", file=sys.stderr)
            sys.exit(2)
        trl_version = trl.__version__
    n = args.prompts * args.group
    args.micro_batch = args.micro_batch or min(8, n)
    if args.group < 2 or args.prompts < 1 or args.steps < 1 or n % args.micro_batch:
        print(f"bench_trl: need -G >= 2, --prompts >= 1, --steps >= 1 and --micro-batch dividing P x G = {n}",
              file=sys.stderr)
        sys.exit(2)
    if args.skip_commands and args.skip_train:
        print("bench_trl: --skip-commands and --skip-train leave no rl3d arm (TRL's completion length is "
              "rl3d's)", file=sys.stderr)
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
              f"G={args.group} = {n} completions a step, micro-batch {args.micro_batch}, one update a step, "
              f"{args.steps} step(s) of rl3d train and TRL; {card}, torch {torch.__version__}, "
              f"trl {trl_version or '(skipped)'}")
        rl3d("synth", "--n", str(args.prompts), "--seed", "1001", "--split", "train", "--no-meshes",
             "--out", str(root / "prompts"))
        r = None if args.skip_commands else run_rl3d(root, policy, args)
        tr = None if args.skip_train else run_train(root, policy, args)
        mean_len = round(r["tokens"] / r["completions"] if r else
                         sum(s["tokens"] for s in tr["steps"]) / sum(s["completions"] for s in tr["steps"]))
        print(f"# {RL3D_REWARD}")
        if tr:
            print("# rl3d train: --rewards the same TOML, --no-meshes (no GLBs, no render stage)")
        t = None
        if not args.skip_trl:
            texts = prompt_texts(root / "prompts", policy)
            print(f"# {TRL_REWARD}\n# TRL prompts: the {len(texts)} synth prompts in rl3d gen's template; TRL "
                  f"samples freely up to max_completion_length = rl3d's mean completion length ({mean_len}, "
                  f"{'the commands' if r else 'rl3d train'}); rl3d's sampler forces the mesh span and the end\n"
                  f"# weights: TRL {'bf16' if args.device == 'cuda' else 'fp32'}; rl3d gen bf16 on CUDA, "
                  f"rl-step / train fp32 weights with bf16 autocast on CUDA (fp32 on CPU)")
            t = run_trl(root, policy, texts, mean_len, args)
        ratios = print_report(r, tr, t, args)
        if args.json:
            args.json.write_text(json.dumps({"shape": args.shape, "parameters": n_params, "device": card,
                                             "torch": torch.__version__, "trl_version": trl_version,
                                             "prompts": args.prompts, "group": args.group, "steps": args.steps,
                                             "micro_batch": args.micro_batch, "rl3d": r, "rl3d_train": tr,
                                             "trl": t, "ratio": ratios["commands_over_trl"],
                                             "ratio_train": ratios["train_over_trl"]}, indent=2, default=str))


if __name__ == "__main__":
    main()
