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
