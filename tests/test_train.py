"""`rl3d train`: the resident loop writes what the commands write, resumes exactly after a kill or
a stop signal, checks swapped stages, and corrects stale samples with truncated importance
sampling. A tiny random policy, 2 prompts, G=2, one 16-pixel view."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import make_tiny_policy

from rl3d.cli.main import main
from rl3d.formats import tables
from rl3d.stages.rl.rl_config import RLConfig
from rl3d.stages.rl.loss import policy_loss
from rl3d.stages.rl.update import tis_metrics, truncated_importance_weights

torch.set_num_threads(1)
PROMPTS = [{"prompt_id": "p-chair", "prompt": "a red chair", "category": "c"},
           {"prompt_id": "p-table", "prompt": "a tall blue table", "category": "c"},
           {"prompt_id": "p-lamp", "prompt": "a small green lamp", "category": "c"}]
SAMPLING = ["--max-reasoning-tokens", "6"]
RENDER = ["--views", "1", "--resolution", "16"]
UPDATE = ["--lr", "1e-3", "--micro-batch", "4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    policy = make_tiny_policy(root / "policy")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:2]))
    return root, policy, prompts


def _cli(args: list[str]):
    res = CliRunner().invoke(main, args)
    return res


def _train_args(policy, prompts, out, steps=1, *extra) -> list[str]:
    return ["train", "--prompts", str(prompts), "--policy", str(policy), "--out", str(out), "--steps", str(steps),
            "--prompts-per-step", "2", "-G", "2", *RENDER, *SAMPLING, *UPDATE, *extra]


def _sorted(path, kind=None) -> list[dict]:
    rows = pq.read_table(path if Path(path).is_file() else sorted(Path(path).glob("part-*.parquet"))[0]).to_pylist()
    return sorted(rows, key=lambda r: (r.get("sample_id"), r.get("view", 0)))


def _metrics(path) -> dict:
    return {r["name"]: r["value"] for r in pq.read_table(sorted(Path(path).glob("part-*.parquet"))[0]).to_pylist()}


def _close(a: dict, b: dict, keys=None, rel=1e-6):
    for k in keys or a:
        if isinstance(a[k], float) and isinstance(b[k], float):
            assert math.isclose(a[k], b[k], rel_tol=rel, abs_tol=1e-9), (k, a[k], b[k])
        elif isinstance(a[k], list) and a[k] and isinstance(a[k][0], float):  # log-probs: batch-order float noise
            torch.testing.assert_close(torch.tensor(a[k]), torch.tensor(b[k]), atol=1e-6, rtol=max(rel, 1e-6))
        else:
            assert a[k] == b[k], (k, a[k], b[k])


def _weights_close(a: Path, b: Path, atol=1e-6):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0)


@pytest.mark.parametrize("mode", ["hi-grpo", "flat"])
def test_step_one_writes_what_the_commands_write(setup, tmp_path, mode):
    root, policy, prompts = setup
    flat = mode == "flat"
    c = tmp_path / "commands"
    gen = ["gen", "--prompts", str(prompts), "--policy", str(policy), "--out", str(c / "gen"), "-G", "2",
           "--seed", "1", "--mode", mode, *SAMPLING]
    for args in (gen,
                 ["render", "--samples", str(c / "gen"), "--out", str(c / "renders"), *RENDER],
                 ["reward", "--samples", str(c / "gen"), "--renders", str(c / "renders"), "--config",
                  "flat" if flat else "default", "--out", str(c / "rewards")],
                 ["rl-step", "--policy", str(policy), "--samples", str(c / "gen"), "--rewards", str(c / "rewards"),
                  "--out", str(c / "policy"), "--algo", "grpo" if flat else "hi-grpo", *UPDATE]):
        res = _cli(args)
        assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    res = _cli(_train_args(policy, prompts, run, 1, "--mode", mode, "--json"))
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["steps_run"] == 1 and summary["step"] == 1
    d = run / "step-000001"
    for stage in ("gen", "renders", "rewards"):
        a, b = _sorted(c / stage), _sorted(d / stage)
        assert len(a) == len(b) > 0, stage
        for ra, rb in zip(a, b):
            _close(ra, rb)
    assert len(_sorted(d / "gen")) == 2 * 2 * (1 if flat else 2)
    # the update: the same advantages, loss, KL and weights (one update; summation order may differ)
    _close({r["sample_id"]: r["advantage"] for r in _sorted(c / "policy" / "advantages")},
           {r["sample_id"]: r["advantage"] for r in _sorted(d / "update" / "advantages")})
    _close(_metrics(c / "policy" / "metrics"), _metrics(d / "update" / "metrics"),
           ["loss", "kl", "grad_norm", "kept_samples", "entropy", "optimizer_updates"], rel=1e-5)
    _weights_close(c / "policy", run / "checkpoints" / "step-000001")
    # the update record and checkpoint name the run's policies: samples of the initial, weights of step 1
    assert tables.provenance(d / "gen").policy == tables.provenance(c / "gen").policy
    ck = json.loads((run / "checkpoints" / "step-000001" / "rl3d_policy.json").read_text())
    assert ck["rl_step"] == ck["step"] == 1 and ck["policy_id"].endswith("#step1")
    assert json.loads((run / "train.json").read_text())["settings"]["mode"] == mode


@pytest.fixture(scope="module")
def three_steps(setup, tmp_path_factory):
    """An uninterrupted 3-step run (checkpoints at 2 and 3), the reference of the resume tests."""
    root, policy, prompts = setup
    prompts3 = root / "prompts3.jsonl"
    prompts3.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    run = tmp_path_factory.mktemp("ref") / "run"
    res = _cli(_train_args(policy, prompts3, run, 3, "--save-every", "2", "--keep-checkpoints", "0", "--json"))
    assert res.exit_code == 0, res.output
    return policy, prompts3, run


def _same_run(a: Path, b: Path):
    """Two runs hold the same steps: final weights, one metrics row set per step, same losses."""
    _weights_close(a / "checkpoints" / "step-000003", b / "checkpoints" / "step-000003")
    ma, mb = pq.read_table(a / "metrics.parquet").to_pylist(), pq.read_table(b / "metrics.parquet").to_pylist()
    steps_a = sorted({r["step"] for r in ma})
    assert steps_a == sorted({r["step"] for r in mb}) == [1, 2, 3]
    for s in steps_a:
        la = [r["value"] for r in ma if r["step"] == s and r["name"] == "loss"]
        lb = [r["value"] for r in mb if r["step"] == s and r["name"] == "loss"]
        assert len(la) == len(lb) == 1 and math.isclose(la[0], lb[0], rel_tol=1e-6, abs_tol=1e-9), s
    for s in (1, 2, 3):
        for stage in ("gen", "rewards"):
            assert [r["sample_id"] for r in _sorted(a / f"step-{s:06d}" / stage)] == \
                [r["sample_id"] for r in _sorted(b / f"step-{s:06d}" / stage)]
            _close(_sorted(a / f"step-{s:06d}" / stage)[0], _sorted(b / f"step-{s:06d}" / stage)[0])


def test_the_prompt_feed_walks_epochs_in_batches(three_steps):
    _, _, run = three_steps
    seen = [sorted(r["prompt_id"] for r in pq.read_table(run / f"step-{s:06d}" / "prompts").to_pylist())
            for s in (1, 2, 3)]
    assert all(len(ids) == 2 for ids in seen)
    # 3 prompts, 2 a step: steps 1 and 2 hold the first epoch's permutation (3 ids) plus one of the second
    first_epoch = seen[0] + [p for p in seen[1] if p not in seen[0]][:1]
    assert sorted(set(first_epoch)) == ["p-chair", "p-lamp", "p-table"]


def test_a_resume_replays_recorded_steps_after_the_last_checkpoint(three_steps, tmp_path):
    policy, prompts, ref = three_steps
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "step-000003")  # as if killed after step 3's update was recorded,
    m = pq.read_table(run / "metrics.parquet")               # and before its metrics reached the run's table
    pq.write_table(m.filter(pc.not_equal(m.column("step"), 3)), run / "metrics.parquet")
    before = {p: p.stat().st_mtime_ns for p in (run / "step-000003").rglob("*") if p.is_file()}
    res = _cli(_train_args(policy, prompts, run, 3, "--save-every", "2", "--keep-checkpoints", "0", "--json"))
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["steps_replayed"] == 1 and summary["steps_run"] == 0
    assert {p: p.stat().st_mtime_ns for p in (run / "step-000003").rglob("*") if p.is_file()} == before
    _weights_close(ref / "checkpoints" / "step-000003", run / "checkpoints" / "step-000003", atol=0)
    assert sorted({r["step"] for r in pq.read_table(run / "metrics.parquet").to_pylist()}) == [1, 2, 3]
    # and a finished run is skipped
    res = _cli(_train_args(policy, prompts, run, 3, "--save-every", "2", "--keep-checkpoints", "0", "--json"))
    assert res.exit_code == 0 and json.loads(res.stdout.strip().splitlines()[-1])["skipped"] is True


def test_a_run_carried_as_its_newest_checkpoint_alone_continues_the_same(three_steps, tmp_path):
    """A run moved to a machine that shares no disk with the last one: train.json, metrics.parquet
    and the newest checkpoint (what docs/train.md says to carry) are enough to go on, and the result
    equals the uninterrupted run."""
    policy, prompts, ref = three_steps
    run = tmp_path / "moved"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(ref / "train.json", run / "train.json")
    m = pq.read_table(ref / "metrics.parquet")
    pq.write_table(m.filter(pc.less_equal(m.column("step"), 2)), run / "metrics.parquet")
    shutil.copytree(ref / "checkpoints" / "step-000002", run / "checkpoints" / "step-000002")
    res = _cli(_train_args(policy, prompts, run, 3, "--save-every", "2", "--keep-checkpoints", "0", "--json"))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["steps_run"] == 1
    _weights_close(ref / "checkpoints" / "step-000003", run / "checkpoints" / "step-000003")
    ma, mb = pq.read_table(ref / "metrics.parquet").to_pylist(), pq.read_table(run / "metrics.parquet").to_pylist()
    for s in (1, 2, 3):
        la = [r["value"] for r in ma if r["step"] == s and r["name"] == "loss"]
        lb = [r["value"] for r in mb if r["step"] == s and r["name"] == "loss"]
        assert len(lb) == 1 and math.isclose(la[0], lb[0], rel_tol=1e-6, abs_tol=1e-9), s
    for stage in ("prompts", "gen", "rewards"):
        assert [r.get("sample_id", r.get("prompt_id")) for r in _sorted(ref / "step-000003" / stage)] == \
            [r.get("sample_id", r.get("prompt_id")) for r in _sorted(run / "step-000003" / stage)]
    assert not (run / "step-000001").exists()


def _spawn(args: list[str], new_group: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "rl3d.cli.main", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_group)


def _wait_for(path: Path, proc: subprocess.Popen, timeout=600.0):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("kill_at", ["step-000001/renders/_manifest.json", "step-000002/update/update.json"])
def test_kill_9_then_train_again_equals_an_uninterrupted_run(three_steps, tmp_path, kill_at):
    policy, prompts, ref = three_steps
    run = tmp_path / "run"
    args = _train_args(policy, prompts, run, 3, "--save-every", "2", "--keep-checkpoints", "0", "--quiet")
    proc = _spawn(args)
    _wait_for(run / kill_at, proc)
    proc.kill()
    proc.wait()
    res = _cli(args + ["--json"])
    assert res.exit_code == 0, res.output
    _same_run(ref, run)


@pytest.mark.parametrize("to", ["the loop", "its process group"])
def test_sigterm_checkpoints_and_exits_0_then_the_run_continues(three_steps, tmp_path, to):
    """SIGTERM to the loop, or to its whole process group (timeout, scancel): the worker processes
    live on, the loop checkpoints and exits 0."""
    policy, prompts, ref = three_steps
    run = tmp_path / "run"
    args = _train_args(policy, prompts, run, 3, "--save-every", "2", "--keep-checkpoints", "0", "--json")
    proc = _spawn(args, new_group=to == "its process group")
    _wait_for(run / "step-000002" / "gen" / "_manifest.json", proc)
    t0 = time.time()
    if to == "the loop":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert time.time() - t0 < 60  # one stage and a checkpoint (docs/train.md)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] == "SIGTERM" and summary["step"] in (1, 2)
    assert (run / "checkpoints" / f"step-{summary['step']:06d}" / "train_state.json").is_file()
    res = _cli(args)
    assert res.exit_code == 0, res.output
    _same_run(ref, run)


def test_time_limit_stops_at_the_first_stage_boundary_past_it(setup, tmp_path):
    """--time-limit: a stop as on SIGTERM (exit 0, "stopped" in the summary), by the clock; resumable,
    so a later call may pass another limit."""
    root, policy, prompts = setup
    run = tmp_path / "run"
    res = _cli(_train_args(policy, prompts, run, 3, "--time-limit", "0.001", "--json"))
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["stopped"] == "time limit" and summary["step"] == 0 and summary["steps_run"] == 0
    assert (run / "step-000001" / "prompts").is_dir() and not (run / "step-000001" / "gen").exists()
    res = _cli(_train_args(policy, prompts, run, 3, "--time-limit", "0.002", "--json"))
    assert res.exit_code == 0 and json.loads(res.stdout.strip().splitlines()[-1])["stopped"] == "time limit"


def test_a_resume_with_other_settings_is_refused(three_steps, tmp_path):
    policy, prompts, ref = three_steps
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    args = _train_args(policy, prompts, run, 3, "--save-every", "2", "--keep-checkpoints", "0", "--lr", "5e-4")
    res = _cli(args)
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "train.json" in res.output and "rl.lr: " in res.output \
        and "--allow-changes" in res.output and "rl.beta" not in res.output  # only what changed
    res = _cli(args + ["--allow-changes", "--steps", "4"])  # one more step, at the new learning rate
    assert res.exit_code == 0, res.output
    assert json.loads((run / "train.json").read_text())["changes"][-1]["to"]["rl"]["lr"] == 5e-4
    assert _metrics(run / "step-000004" / "update" / "metrics")["lr"] == 5e-4


SWAP_SCRIPTS = {
    "wrong schema": "import pyarrow as pa, pyarrow.parquet as pq, sys, os; os.makedirs(sys.argv[1], exist_ok=True); "
                    "pq.write_table(pa.table({'foo': [1]}), sys.argv[1] + '/part-0.parquet')",
    "other ids": "import pyarrow as pa, pyarrow.parquet as pq, sys, os; os.makedirs(sys.argv[1], exist_ok=True); "
                 "pq.write_table(pa.table({'sample_id': ['x-0-coarse'], 'prompt_id': ['x'], "
                 "'sample_index': pa.array([0], pa.int32()), 'level': ['coarse'], 'total': [1.0], "
                 "'status': ['ok'], 'message': ['']}), sys.argv[1] + '/part-0.parquet')",
    "nothing": "pass",
}


@pytest.mark.parametrize("case", list(SWAP_SCRIPTS))
def test_a_swapped_stage_that_writes_the_wrong_thing_is_a_one_line_error(setup, tmp_path, case):
    root, policy, prompts = setup
    script = tmp_path / "scorer.py"
    script.write_text(SWAP_SCRIPTS[case])
    run = tmp_path / "run"
    res = _cli(_train_args(policy, prompts, run, 1, "--stage", f"reward={sys.executable} {script} {{out}}",
                           "--quiet"))
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and "step 1, stage reward" in line
    assert {"wrong schema": "missing", "other ids": "not one of this step's", "nothing": "wrote no table"}[case] in line
    for stage in ("prompts", "gen", "renders"):  # the earlier stages stay complete
        assert json.loads((run / "step-000001" / stage / "_manifest.json").read_text())["complete"]
    assert not (run / "step-000001" / "update").exists()


def test_a_swapped_stage_command_runs_and_its_output_is_used(setup, tmp_path):
    root, policy, prompts = setup
    run = tmp_path / "run"
    cmd = (f"{sys.executable} -m rl3d.cli.main reward --samples {{samples}} --renders {{renders}} --config default "
           f"--out {{out}} --quiet")
    res = _cli(_train_args(policy, prompts, run, 1, "--stage", f"reward={cmd}", "--json"))
    assert res.exit_code == 0, res.output
    marker = json.loads((run / "step-000001" / "rewards" / "_swapped.json").read_text())
    assert marker["argv"][0] == sys.executable and marker["inputs"]["samples"].endswith("step-000001/gen")
    assert (run / "step-000001" / "update" / "update.json").is_file()
    res = _cli(_train_args(policy, prompts, run, 1, "--stage", "gen=rl3d gen {out}"))
    assert res.exit_code == 2 and "only render, reward can be swapped" in res.output


def test_truncated_importance_weights_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    behaviour = torch.tensor([[-1.5, -1.0, -0.5]])
    w = truncated_importance_weights(old, behaviour, 2.0)
    # exp(0.5) = 1.6487 stays; exp(-1) = 0.3679 stays; exp(0) = 1
    torch.testing.assert_close(w, torch.tensor([[math.exp(0.5), math.exp(-1.0), 1.0]]))
    assert truncated_importance_weights(torch.tensor([3.0]), torch.tensor([0.0]), 2.0).item() == 2.0
    rows = [{"tis": w[0], "prompt_len": 1, "reasoning_end": 2, "mesh_end": 4, "input_ids": [0, 1, 2, 3],
             "reasoning_truncated": False}]
    m = tis_metrics(rows, 2.0)
    assert m["tis_clip_frac"] == 0.0 and m["tis_weight_mean"] == pytest.approx(w[0].mean().item())


def test_tis_weights_scale_the_policy_gradient_term_only():
    cfg = RLConfig(beta=0.1)
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old, ref = torch.tensor([[-1.1, -2.0]]), torch.tensor([[-1.0, -1.5]])
    adv, weights = torch.tensor([0.7]), torch.tensor([[0.5, 0.5]])
    plain, _ = policy_loss(logp, old, ref, adv, weights, cfg)
    ones, _ = policy_loss(logp, old, ref, adv, weights, cfg, torch.ones(1, 2))
    assert ones.item() == plain.item()
    tis = torch.tensor([[2.0, 0.5]])
    got, _ = policy_loss(logp, old, ref, adv, weights, cfg, tis)
    ratio = torch.exp(logp - old)
    pg = torch.minimum(ratio * 0.7, ratio.clamp(0.8, 1.28) * 0.7) * tis
    d = ref - logp
    kl = torch.exp(d) - d - 1
    want = -((pg - 0.1 * kl) * weights).sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert RLConfig(old_logprobs="recompute", tis_cap=math.inf).check().tis_cap == math.inf


def test_overlap_with_a_frozen_policy_and_no_cap_gives_the_same_loss(setup, tmp_path, monkeypatch):
    """... and the background sampling runs under the overlap's short GIL switch interval, which is
    the interpreter's own again once the run ends."""
    import sys

    from rl3d.stages import train as train_stage

    root, policy, prompts = setup
    seen, own = [], sys.getswitchinterval()
    background = train_stage.TrainJob._gen_on_own_stream

    def recording(self, step, sampler):
        seen.append(sys.getswitchinterval())
        return background(self, step, sampler)

    monkeypatch.setattr(train_stage.TrainJob, "_gen_on_own_stream", recording)
    frozen = ["--lr", "0", "--micro-batch", "4", "--old-logprobs", "recompute"]
    base = ["train", "--prompts", str(prompts), "--policy", str(policy), "--steps", "2", "--prompts-per-step", "2",
            "-G", "2", *RENDER, *SAMPLING, *frozen]
    a = _cli(base + ["--out", str(tmp_path / "seq"), "--overlap", "0"])
    b = _cli(base + ["--out", str(tmp_path / "ovl"), "--overlap", "1", "--tis-cap", "inf"])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ma = _metrics(tmp_path / "seq" / "step-000002" / "update" / "metrics")
    mb = _metrics(tmp_path / "ovl" / "step-000002" / "update" / "metrics")
    assert mb["staleness"] == 1 and ma["staleness"] == 0
    assert mb["tis_weight_mean"] == pytest.approx(1.0, abs=1e-5) and mb["tis_clip_frac"] == 0.0
    assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-6, abs=1e-7)
    # the overlapped step 2 was sampled by the initial policy, the sequential one by step 1's
    pa_, pb = (tables.provenance(tmp_path / r / "step-000002" / "gen").policy for r in ("seq", "ovl"))
    assert pb.endswith("#step3") and pa_.endswith("#step1")
    assert seen == [pytest.approx(train_stage.OVERLAP_SWITCH_S)] and sys.getswitchinterval() == own > 10 * seen[0]


def test_bad_settings_fail_before_anything_is_written(setup, tmp_path):
    root, policy, prompts = setup
    for extra, says in ((["--steps", "0"], "--steps 0"), (["--rewards", "nope"], "nope"),
                        (["--eval-every", "2"], "--eval-bench"), (["--stage", "reward=score"], "{out}")):
        run = tmp_path / "r"
        res = _cli(_train_args(policy, prompts, run, 1, *extra))
        assert res.exit_code == 2 and says in res.output, (extra, res.output)
        assert not run.exists()
    res = _cli(["train", "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "none.txt" in res.output


def test_no_meshes_skips_glbs_and_renders_and_refuses_view_terms(setup, tmp_path):
    """--no-meshes: gen writes no GLBs, no render stage runs, and the voxel-grid terms still score
    every sample; a reward that scores views is refused before anything is written."""
    root, policy, prompts = setup
    res = _cli(_train_args(policy, prompts, tmp_path / "refused", 1, "--no-meshes"))
    assert res.exit_code == 2 and "--no-meshes: reward term 'clip_score'" in res.output, res.output
    assert not (tmp_path / "refused").exists()
    toml = tmp_path / "geometry.toml"
    toml.write_text('name = "geometry"\ndescription = "voxel-grid terms"\n'
                    '[[levels.coarse]]\nname = "ground_contact"\nbackend = "geometry"\nweight = 1.0\n'
                    '[[levels.fine]]\nname = "stability"\nbackend = "geometry"\nweight = 1.0\n')
    run = tmp_path / "run"
    res = _cli(_train_args(policy, prompts, run, 1, "--no-meshes", "--rewards", str(toml)))
    assert res.exit_code == 0, res.output
    step = run / "step-000001"
    assert not (step / "renders").exists() and not list((step / "gen").glob("_meshes/*"))
    rewards = _sorted(step / "rewards")
    assert len(rewards) == 8 and all(r["status"] == "ok" and r["total"] is not None for r in rewards)
    assert (step / "update").is_dir()
    assert json.loads((run / "train.json").read_text())["settings"]["meshes"] is False


def test_no_sheet_renders_the_views_only(setup, three_steps, tmp_path):
    """--no-sheet: the renders table has no sheet_path and no sheet.png is written (rl3d render
    --no-sheet's output); recorded in train.json only when off."""
    root, policy, prompts = setup
    run = tmp_path / "run"
    res = _cli(_train_args(policy, prompts, run, 1, "--no-sheet"))
    assert res.exit_code == 0, res.output
    renders = run / "step-000001" / "renders"
    assert "sheet_path" not in pq.read_schema(sorted(renders.glob("part-*.parquet"))[0]).names
    assert list(renders.glob("_images/*/view-00.png")) and not list(renders.glob("_images/*/sheet.png"))
    assert json.loads((run / "train.json").read_text())["settings"]["sheet"] is False
    assert "sheet" not in json.loads((three_steps[2] / "train.json").read_text())["settings"]


def test_two_processes_write_the_one_process_tables_and_update(setup, tmp_path):
    """DDP on CPU (gloo): each process samples, renders and scores its shard of the step's prompts
    into the same folders; the union is the one-process output and the update matches it."""
    root, policy, prompts = setup
    one, two = tmp_path / "one", tmp_path / "two"
    res = _cli(_train_args(policy, prompts, one, 1, "--device", "cpu"))
    assert res.exit_code == 0, res.output
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rl3d.cli.main", *_train_args(policy, prompts, two, 1, "--device", "cpu", "--quiet")]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((two / "step-000001" / "gen").glob("part-*-of-00002.parquet"))) == 2
    for stage in ("gen", "renders", "rewards"):
        a = sorted(tables.read_table(one / "step-000001" / stage, {"gen": "samples"}.get(stage, stage))
                   .to_pylist(), key=lambda r: (r["sample_id"], r.get("view", 0)))
        b = sorted(tables.read_table(two / "step-000001" / stage, {"gen": "samples"}.get(stage, stage))
                   .to_pylist(), key=lambda r: (r["sample_id"], r.get("view", 0)))
        assert [r["sample_id"] for r in a] == [r["sample_id"] for r in b], stage
        for ra, rb in zip(a, b):
            _close({k: v for k, v in ra.items() if not k.endswith("_path")},
                   {k: v for k, v in rb.items() if not k.endswith("_path")}, rel=1e-4)  # batch-composition noise
    m1, m2 = _metrics(one / "step-000001" / "update" / "metrics"), _metrics(two / "step-000001" / "update" / "metrics")
    for k in ("loss", "kl", "grad_norm"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
    w0 = load_file(Path(policy) / "model.safetensors")
    w1, w2 = (load_file(r / "checkpoints" / "step-000001" / "model.safetensors") for r in (one, two))
    moved = sum(float(((w1[k] - w0[k]) ** 2).sum()) for k in w1) ** 0.5
    apart = sum(float(((w1[k] - w2[k]) ** 2).sum()) for k in w1) ** 0.5
    assert moved > 0 and apart < 1e-2 * moved


def test_overwrite_starts_the_run_over_and_then_drops_the_old_one(setup, tmp_path):
    root, policy, prompts = setup
    run = tmp_path / "run"
    assert _cli(_train_args(policy, prompts, run, 1)).exit_code == 0
    (run / "marker-of-the-old-run").write_text("x")
    res = _cli(_train_args(policy, prompts, run, 1, "--overwrite", "--json"))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["steps_run"] == 1
    assert not (run / "marker-of-the-old-run").exists() and (run / "checkpoints" / "step-000001").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the set-aside copy is gone


def test_lora_run_checkpoints_the_adapter_and_resumes_to_the_same_policy(setup, tmp_path):
    """--lora-rank trains an adapter on the initial policy: a checkpoint holds the adapter and its
    optimizer state (no base weights), the last step also a merged policy dir every command loads;
    a run stopped after step 1 and resumed equals an uninterrupted one, and the adapter moved the
    policy away from the initial weights."""
    pytest.importorskip("peft")
    root, policy, prompts = setup
    lora = ["--lora-rank", "4", "--save-every", "1"]
    whole = tmp_path / "whole"
    res = _cli(_train_args(policy, prompts, whole, 2, *lora))
    assert res.exit_code == 0, res.output
    first, last = whole / "checkpoints" / "step-000001", whole / "checkpoints" / "step-000002"
    assert (first / "adapter" / "adapter_model.safetensors").is_file() and (first / "optimizer.pt").is_file()
    assert not (first / "model.safetensors").exists()  # no merged write on a step nobody loads
    assert (last / "adapter" / "adapter_config.json").is_file() and (last / "model.safetensors").is_file()
    adapter = load_file(first / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    from rl3d.stages.policy.checkpoint import load_policy

    merged = load_policy(last, device="cpu", dtype="float32")  # a policy dir, loaded as the commands do
    assert merged.policy_id.endswith("#step2")
    base = load_file(Path(policy) / "model.safetensors")
    moved = load_file(last / "model.safetensors")
    assert any(not torch.equal(base[k], moved[k]) for k in base if k in moved)

    resumed = tmp_path / "resumed"
    for steps in (1, 2):
        res = _cli(_train_args(policy, prompts, resumed, steps, *lora))
        assert res.exit_code == 0, res.output
    _weights_close(whole / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    for stage in ("gen", "rewards"):
        for ra, rb in zip(_sorted(whole / "step-000002" / stage), _sorted(resumed / "step-000002" / stage)):
            _close(ra, rb)


def test_profile_step_writes_the_python_profile_of_that_step(setup, tmp_path):
    """--profile-step K: step K's main-thread Python profile (text and pstats) under RUN/profile; a
    setting a resume may change."""
    import pstats

    root, policy, prompts = setup
    toml = tmp_path / "geometry.toml"
    toml.write_text('name = "geometry"\ndescription = "voxel-grid terms"\n'
                    '[[levels.coarse]]\nname = "ground_contact"\nbackend = "geometry"\nweight = 1.0\n'
                    '[[levels.fine]]\nname = "stability"\nbackend = "geometry"\nweight = 1.0\n')
    run = tmp_path / "run"
    res = _cli(_train_args(policy, prompts, run, 2, "--no-meshes", "--rewards", str(toml), "--profile-step", "2"))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (run / "profile").iterdir()) == ["step-000002.pstats", "step-000002.txt"]
    text = (run / "profile" / "step-000002.txt").read_text()
    assert "step 2" in text and "(_step)" in text and "(run_updates)" in text and "(produce)" in text
    assert pstats.Stats(str(run / "profile" / "step-000002.pstats")).total_tt > 0
    res = _cli(_train_args(policy, prompts, run, 3, "--no-meshes", "--rewards", str(toml), "--profile-step", "0"))
    assert res.exit_code == 0, res.output
    res = _cli(_train_args(policy, prompts, run, 3, "--profile-step", "-1"))
    assert res.exit_code == 2 and "--profile-step -1: must be >= 0" in res.output
