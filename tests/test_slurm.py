"""The multi-node rl-step Slurm script: its syntax and, through its dry-run mode, the command line
each node runs (the rendezvous taken from the Slurm job's environment). No Slurm needed."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "slurm" / "rl_step_multinode.sbatch"


def dry_run(**env) -> list[str]:
    base = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "RUN": "runs/big", "POLICY": "runs/big/step-000003/policy",
            "STEP_DIR": "runs/big/step-000004"}
    return subprocess.run(["bash", str(SCRIPT)], env={**base, **env}, cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.splitlines()


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    subprocess.run(["bash", "-n", str(ROOT / "examples" / "slurm" / "submit_step.sh")], check=True)


def test_torchrun_rendezvous_from_slurm_env():
    lines = dry_run(SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES="2", SLURM_JOB_ID="1234", SLURM_GPUS_ON_NODE="4")
    srun, nodes = lines[0], lines[1:]
    assert srun.startswith("srun --nodes 2 --ntasks-per-node 1 ")
    assert [n.split(":")[0] for n in nodes] == ["node 0", "node 1"]
    cmd = nodes[0].split(": ", 1)[1].split()
    assert cmd[:1] == ["torchrun"]
    flags = dict(zip(cmd[1:11:2], cmd[2:11:2]))
    assert flags == {"--nnodes": "2", "--nproc_per_node": "4", "--rdzv_id": "1234", "--rdzv_backend": "c10d",
                     "--rdzv_endpoint": "gpu07:29734"}  # the first node; port 29500 + job id mod 1000
    tail = " ".join(cmd[11:])
    assert tail.startswith("-m rl3d.cli.main rl-step --policy runs/big/step-000003/policy "
                           "--samples runs/big/step-000004/gen --rewards runs/big/step-000004/rewards "
                           "--out runs/big/step-000004/policy --run-metrics runs/big/metrics.parquet")
    assert nodes[0].split(": ", 1)[1] == nodes[1].split(": ", 1)[1]  # torchrun assigns the node ranks


def test_accelerate_gets_each_node_rank():
    lines = dry_run(LAUNCHER="accelerate", CONFIG="examples/accelerate/fsdp.yaml", SLURM_JOB_NODELIST="a1,b2,c3",
                    SLURM_NNODES="3", SLURM_JOB_ID="5", GPUS_PER_NODE="8", MASTER_PORT="31000",
                    RL_ARGS="--failed-rewards penalty")
    assert "--machine_rank\\ \\$SLURM_NODEID" in lines[0]  # expanded by each node's own shell
    for rank, line in enumerate(lines[1:]):
        cmd = line.split(": ", 1)[1]
        assert f"--machine_rank {rank} " in cmd
        assert ("--config_file examples/accelerate/fsdp.yaml --num_machines 3 --num_processes 24 "
                "--machine_rank") in cmd
        assert "--main_process_ip a1 --main_process_port 31000 --rdzv_backend c10d" in cmd
        assert cmd.endswith("--failed-rewards penalty")


def test_unknown_launcher_exits_2():
    r = subprocess.run(["bash", str(SCRIPT)], env={"PATH": os.environ["PATH"], "DRY_RUN": "1", "RUN": "r",
                                                   "POLICY": "p", "STEP_DIR": "s", "LAUNCHER": "mpirun"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and "LAUNCHER=mpirun" in r.stderr


@pytest.mark.parametrize("missing", ["RUN", "POLICY", "STEP_DIR"])
def test_required_settings(missing):
    env = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "RUN": "r", "POLICY": "p", "STEP_DIR": "s"}
    del env[missing]
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and missing in r.stderr


# ---- one dry-run convention for every Slurm script: DRY_RUN=1 prints, runs and creates nothing ----

def _trap_path(tmp_path: Path) -> tuple[str, Path]:
    """A PATH whose sbatch, srun, rl3d and accelerate only leave a mark: a dry run must not call them."""
    bin_dir, mark = tmp_path / "bin", tmp_path / "called"
    bin_dir.mkdir()
    for name in ("sbatch", "srun", "rl3d", "accelerate", "scontrol"):
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\necho {name} >> {mark}\necho 99\n")
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}", mark


def test_submit_step_dry_run_prints_the_chain_and_submits_nothing(tmp_path):
    path, mark = _trap_path(tmp_path)
    env = {"PATH": path, "DRY_RUN": "1", "RUN": "runs/big", "PROMPTS": "data/prompts",
           "POLICY": "runs/big/step-000003/policy", "STEP": "4", "N": "2"}
    r = subprocess.run(["bash", str(ROOT / "examples/slurm/submit_step.sh")], env=env, cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines[:4]] == ["sbatch"] * 4
    assert "--array=0-1" in lines[0] and "STAGE=gen" in lines[0] and "--dependency" not in lines[0]
    assert "--dependency=afterok:<gen>" in lines[1] and "STAGE=render" in lines[1]
    assert "--dependency=afterok:<render>" in lines[2] and "STAGE=reward" in lines[2]
    assert "--dependency=afterok:<reward>" in lines[3] and "STAGE=rl-step" in lines[3]
    assert "STEP_DIR=runs/big/step-000004" in lines[0]
    assert lines[4] == "step 4: gen=<gen> render=<render> reward=<reward> rl-step=<rl-step>"
    assert not mark.exists() and not (tmp_path / "logs").exists()
    env["NODES"] = "2"
    r = subprocess.run(["bash", str(ROOT / "examples/slurm/submit_step.sh")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, check=True)
    assert r.stdout.splitlines()[3].endswith("examples/slurm/rl_step_multinode.sbatch")
    assert not mark.exists() and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("stage, expected", [
    ("gen", "rl3d gen --prompts p --policy q --out s/gen -G 8 --seed 0 --quiet"),
    ("render", "rl3d render --samples s/gen --out s/renders --quiet"),
    ("reward", "rl3d reward --samples s/gen --renders s/renders --config default --out s/rewards --quiet"),
    ("rl-step", "accelerate launch --config_file examples/accelerate/ddp.yaml -m rl3d.cli.main rl-step --policy q "
                "--samples s/gen --rewards s/rewards --out s/policy --run-metrics r/metrics.parquet --quiet"),
])
def test_step_sbatch_dry_run_prints_the_stage(tmp_path, stage, expected):
    path, mark = _trap_path(tmp_path)
    env = {"PATH": path, "DRY_RUN": "1", "STAGE": stage, "RUN": "r", "PROMPTS": "p", "POLICY": "q", "STEP_DIR": "s"}
    r = subprocess.run(["bash", str(ROOT / "examples/slurm/step.sbatch")], env=env, cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected
    assert not mark.exists() and not (tmp_path / "s").exists()


def test_step_sbatch_unknown_stage_exits_2(tmp_path):
    path, mark = _trap_path(tmp_path)
    r = subprocess.run(["bash", str(ROOT / "examples/slurm/step.sbatch")],
                       env={"PATH": path, "DRY_RUN": "1", "STAGE": "rlstep", "STEP_DIR": "s"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and "STAGE=rlstep" in r.stderr and not mark.exists()


def test_multinode_dry_run_runs_nothing(tmp_path):
    path, mark = _trap_path(tmp_path)
    r = subprocess.run(["bash", str(SCRIPT)], env={"PATH": path, "DRY_RUN": "1", "RUN": "r", "POLICY": "p",
                                                   "STEP_DIR": "s", "SLURM_JOB_NODELIST": "gpu[01-02]",
                                                   "SLURM_NNODES": "2"},
                       cwd=tmp_path, capture_output=True, text=True, check=True)
    assert r.stdout.startswith("srun ")
    assert not (tmp_path / "logs").exists()
    assert not (mark.exists() and "srun" in mark.read_text())
