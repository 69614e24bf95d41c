"""The example pipelines are wired right: the Makefile's plan and the scripts' syntax."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_makefile_plans_the_loop_in_order(tmp_path):
    out = subprocess.run(["make", "-n", "-f", "examples/Makefile", f"RUN={tmp_path}/run", "STEPS=2",
                          "RL3D=rl3d", f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    stages = [line.split()[1] for line in out if line.startswith("rl3d ")]
    assert stages == ["synth"] + ["gen", "render", "reward", "rl-step"] * 2
    step2_gen = next(line for line in out if "step-000002/gen" in line and line.startswith("rl3d gen"))
    assert "--policy " + f"{tmp_path}/run/step-000001/policy" in step2_gen  # step 2 samples from step 1's policy


@pytest.mark.parametrize("script", ["examples/demo.sh", "examples/learning_run.sh", "examples/setup.sh",
                                    "examples/train_default_policy.sh", "examples/train_default_scorer.sh",
                                    "examples/slurm/step.sbatch", "examples/slurm/submit_step.sh",
                                    "benchmarks/distributed_check.sh", "benchmarks/learning_slice.sh",
                                    "examples/setup_offline.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_makefile_passes_extra_rl_step_options(tmp_path):
    out = subprocess.run(["make", "-n", "-f", "examples/Makefile", f"RUN={tmp_path}/run", "STEPS=1", "RL3D=rl3d",
                          f"PYTHON={sys.executable}", "RL_ARGS=--kl-max 10 --failed-rewards penalty"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "--kl-max 10 --failed-rewards penalty" in next(l for l in out.splitlines() if l.startswith("rl3d rl-step"))


STUB = r"""#!/usr/bin/env bash
# stands in for rl3d: logs the call and writes the completion marker a real stage writes last
echo "$*" >> "$LOG"
out=""; shard="0/1"; prev=""
for a in "$@"; do
  [ "$prev" = --out ] && out=$a; [ "$prev" = --shard ] && shard=$a; prev=$a
done
case $1 in
  gen|render|reward) i=${shard%/*}; n=${shard#*/}; mkdir -p "$out/_shards"
    touch "$out/_shards/$(printf %05d "$i")-of-$(printf %05d "$n").json";;
  rl-step) mkdir -p "$out"; touch "$out/rl_step.json";;
esac
"""


@pytest.mark.parametrize("eval_async", ["0", "1"])
def test_learning_run_shards_stages_and_resumes(tmp_path, eval_async):
    """learning_run.sh's plan: every gen/render/reward as SHARDS processes, rl-step with the recipe's
    options, held-out scoring of the start and the evaluated steps; a rerun redoes nothing."""
    import os

    stub = tmp_path / "rl3d"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "LOG": str(log), "RL3D": str(stub), "RUN": str(tmp_path / "run"), "STEPS": "2",
           "EVAL_EVERY": "2", "EVAL_SEEDS": "101", "SHARDS": "3", "EVAL_ASYNC": eval_async, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(ROOT / "examples/learning_run.sh")], env=env, check=True, capture_output=True)
    calls = log.read_text().splitlines()
    verbs = [c.split()[0] for c in calls]
    # gen runs for the baseline, steps 1 and 2, and the step-2 eval, each as 3 shard processes
    assert verbs.count("gen") == verbs.count("render") == verbs.count("reward") == 4 * 3
    assert sorted(c.split("--shard ")[1] for c in calls if c.startswith("gen"))[:3] == ["0/3", "0/3", "0/3"]
    rl = [c for c in calls if c.startswith("rl-step")]
    assert len(rl) == 2 and "--failed-rewards penalty" in rl[0] and "--kl-max 10" in rl[0]
    assert f"--policy {tmp_path}/run/step-000001/policy" in rl[1]
    n = len(calls)
    subprocess.run(["bash", str(ROOT / "examples/learning_run.sh")], env=env, check=True, capture_output=True)
    # only the idempotent prompts and the (cheap, idempotent) held-out summary
    assert [c.split()[0] for c in log.read_text().splitlines()[n:]] == ["synth", "learning-summary"]
