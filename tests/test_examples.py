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
                                    "examples/slurm/step.sbatch", "examples/slurm/submit_step.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)
