"""`rl3d train` against the command pipeline (gen -> render -> reward -> rl-step, one process each)
on the same prompts, policy, settings and machine, in one run; prints seconds per step of each and
the ratio. Optionally a third arm with --overlap 1.

    python benchmarks/bench_train.py                       # the default iteration: 64 prompts x G=8, 6 views at 512 px
    python benchmarks/bench_train.py --device cpu --prompts 2 -G 2 --views 1 --resolution 32 --steps 2 \
        --max-reasoning-tokens 8
    python benchmarks/bench_train.py --overlap --json out.json
    python benchmarks/bench_train.py --skip-commands --overlap --profile-step 3 --keep runs/bench   # profiles in runs/bench/*/profile/

Both arms write RUN/step-NNNNNN/{gen,renders,rewards} the same way; the pipeline's rl-step writes a
full checkpoint every step (it must: the next gen loads it), the loop one at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RL3D = [sys.executable, "-m", "rl3d.cli.main"]


def sh(args: list[str], env: dict) -> dict:
    out = subprocess.run(RL3D + args + ["--json"], check=True, stdout=subprocess.PIPE, env=env, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def commands(run: Path, prompts: Path, a, env: dict) -> list[dict]:
    """The pipeline, step after step, as examples/Makefile runs it; seconds per phase per step."""
    from rl3d.stages.policy import default_policy_dir

    policy = a.policy or str(default_policy_dir())
    dev = ["--device", a.device] if a.device else []
    budget = ["--max-reasoning-tokens", str(a.max_reasoning_tokens)] if a.max_reasoning_tokens else []
    steps = []
    for i in range(1, a.steps + 1):
        d = run / f"step-{i:06d}"
        t = {}
        t0 = time.time()
        sh(["gen", "--prompts", str(prompts), "--policy", policy, "--out", str(d / "gen"), "-G", str(a.group_size),
            "--seed", str(a.seed + i), *dev, *budget], env)
        t["gen"] = time.time() - t0
        t0 = time.time()
        sh(["render", "--samples", str(d / "gen"), "--out", str(d / "renders"), "--views", str(a.views),
            "--resolution", str(a.resolution)], env)
        t["render"] = time.time() - t0
        t0 = time.time()
        sh(["reward", "--samples", str(d / "gen"), "--renders", str(d / "renders"), "--config", "default",
            "--out", str(d / "rewards")], env)
        t["reward"] = time.time() - t0
        t0 = time.time()
        sh(["rl-step", "--policy", policy, "--samples", str(d / "gen"), "--rewards", str(d / "rewards"),
            "--out", str(d / "policy"), "--lr", str(a.lr), "--seed", str(a.seed), *dev], env)
        t["update"] = time.time() - t0
        policy = str(d / "policy")
        steps.append(t)
        print(f"commands step {i}: {sum(t.values()):.1f}s " + " ".join(f"{k} {v:.1f}s" for k, v in t.items()),
              file=sys.stderr, flush=True)
    return steps


def train(run: Path, prompts: Path, a, env: dict, overlap: int) -> dict:
    args = ["train", "--prompts", str(prompts), "--out", str(run), "--steps", str(a.steps), "--prompts-per-step",
            str(a.prompts), "-G", str(a.group_size), "--views", str(a.views), "--resolution", str(a.resolution),
            "--lr", str(a.lr), "--seed", str(a.seed), "--save-every", str(a.steps), "--overlap", str(overlap)]
    if a.device:
        args += ["--device", a.device]
    if a.policy:
        args += ["--policy", a.policy]
    if a.gen_batch_size:
        args += ["--gen-batch-size", str(a.gen_batch_size)]
    if a.max_reasoning_tokens:
        args += ["--max-reasoning-tokens", str(a.max_reasoning_tokens)]
    if a.profile_step:
        args += ["--profile-step", str(a.profile_step)]
    t0 = time.time()
    summary = sh(args, env)
    summary["wall_s"] = time.time() - t0
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=64, help="prompts a step (the same prompts every step)")
    p.add_argument("-G", "--group-size", type=int, default=8)
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--gen-batch-size", type=int, default=None, help="rl3d train --gen-batch-size")
    p.add_argument("--policy", default=None, help="policy dir (default: the embedded default)")
    p.add_argument("--max-reasoning-tokens", type=int, default=None, help="reasoning budget (default: the policy's)")
    p.add_argument("--profile-step", type=int, default=0,
                   help="rl3d train --profile-step in each train arm (RUN/profile/; keep the runs with --keep)")
    p.add_argument("--overlap", action="store_true", help="also time rl3d train --overlap 1")
    p.add_argument("--skip-commands", action="store_true", help="time rl3d train only")
    p.add_argument("--keep", default=None, help="keep the runs in this folder")
    p.add_argument("--json", default=None, help="write the figures to this file")
    a = p.parse_args()
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-train-"))
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    prompts = root / "prompts"
    sh(["synth", "--n", str(a.prompts), "--seed", "11", "--split", "train", "--out", str(prompts), "--no-meshes"], env)

    res: dict = {"settings": vars(a)}
    try:
        import torch
        res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() and a.device != "cpu" else "cpu"
    except Exception:
        res["device"] = "unknown"
    t = train(root / "train", prompts, a, env, 0)
    res["train"] = t
    print(f"train: {t['seconds_per_step']}s a step (steady {t['steady_seconds_per_step']}s), "
          f"{t['wall_s']:.1f}s in all, phases {t.get('phase_seconds')}", file=sys.stderr, flush=True)
    if not a.skip_commands:
        t0 = time.time()
        steps = commands(root / "commands", prompts / "part-00000-of-00001.parquet", a, env)
        res["commands"] = {"steps": steps, "wall_s": time.time() - t0}
        per = [sum(s.values()) for s in steps]
        cmd_step = sum(per) / len(per)
        cmd_steady = sum(per[1:]) / len(per[1:]) if len(per) > 1 else cmd_step
        res["ratio_per_step"] = cmd_step / t["seconds_per_step"]
        res["ratio_steady"] = cmd_steady / (t["steady_seconds_per_step"] or t["seconds_per_step"])
        res["ratio_wall"] = res["commands"]["wall_s"] / t["wall_s"]
        print(f"commands: {cmd_step:.1f}s a step (steady {cmd_steady:.1f}s), {res['commands']['wall_s']:.1f}s in all",
              file=sys.stderr)
        print(f"ratio commands / train: per step {res['ratio_per_step']:.2f}x, steady {res['ratio_steady']:.2f}x, "
              f"whole run {res['ratio_wall']:.2f}x  ({res['device']})", flush=True)
    if a.overlap:
        try:
            o = train(root / "train-overlap", prompts, a, env, 1)
        except subprocess.CalledProcessError as e:
            res["train_overlap"] = {"error": f"exit {e.returncode}"}
            print(f"train --overlap 1 failed (exit {e.returncode})", file=sys.stderr)
        else:
            res["train_overlap"] = o
            res["ratio_overlap_steady"] = (t["steady_seconds_per_step"] or t["seconds_per_step"]) / \
                (o["steady_seconds_per_step"] or o["seconds_per_step"])
            print(f"train --overlap 1: {o['seconds_per_step']}s a step (steady {o['steady_seconds_per_step']}s), "
                  f"{o['wall_s']:.1f}s in all, phases {o.get('phase_seconds')}", file=sys.stderr)
            print(f"ratio train / train --overlap 1 (steady s a step): {res['ratio_overlap_steady']:.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2, default=str))
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
