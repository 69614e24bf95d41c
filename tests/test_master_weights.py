"""--bf16-weights (stages/rl/master_weights.py): bf16 parameters with float32 masters in the
optimizer, on a small module and on a tiny policy (CPU, --dtype bfloat16, bf16 autocast)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import rl_batch, step_metrics

from rl3d.cli.main import main
from rl3d.formats.errors import InputError
from rl3d.stages.rl.learner import Learner, make_optimizer, read_batch
from rl3d.stages.rl.master_weights import MasterWeights, MasterWeightsAccelerator, check_setup
from rl3d.stages.rl.micro_batch import state_bytes
from rl3d.stages.rl.rl_config import RLConfig
from rl3d.stages.rl_step import run_rl_step

torch.set_num_threads(1)
UPDATE = {"lr": 1e-3, "micro_batch": 4, "minibatch": 6}


def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting a process; a bf16 learner and a float32 one
    each need their own."""
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def own_accelerate_state():
    fresh_accelerate_state()
    yield
    fresh_accelerate_state()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return rl_batch(tmp_path_factory.mktemp("bf16w"))


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))


def _loss(model, x, y):
    dtype = next(model.parameters()).dtype
    return ((model(x.to(dtype)).float() - y) ** 2).sum()


def _step(root, policy, out, dtype="bfloat16", allow_off_policy=False, **kw):
    """One rl-step on rl_batch's tables with --dtype `dtype` (bfloat16: bf16 compute on the CPU with bf16_weights)."""
    cfg = RLConfig(**{**UPDATE, **kw})
    fresh_accelerate_state()
    return run_rl_step(policy, root / "gen", root / "rewards", out, cfg, run_metrics=str(out.parent / "m.parquet"),
                       dtype=dtype, allow_off_policy=allow_off_policy)


def _learner(policy_dir, dtype="bfloat16", **kw) -> Learner:
    fresh_accelerate_state()
    return Learner(policy_dir, RLConfig(**{**UPDATE, **kw}), device="cpu", dtype=dtype)


# ---- the mechanism, on a small module ----------------------------------------------------------

def test_parameters_become_bf16_roundings_of_their_float32_masters():
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    mw = MasterWeights(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.dtype == torch.float32 for m in mw.masters)
    for p, m, b in zip(model.parameters(), mw.masters, before):
        assert torch.equal(m, b) and torch.equal(p.detach(), b.to(torch.bfloat16))
    # micro-batch "auto" counts the masters: 2 (bf16 weight) + 4 (master) + 4 (its gradient) + 8 (AdamW)
    assert state_bytes(model) == 18 * sum(p.numel() for p in model.parameters())


def test_micro_batch_gradients_sum_in_float32_and_match_one_big_batch():
    model = _mlp()
    mw = MasterWeights(model)
    bf16_copy = copy.deepcopy(model)  # the same bf16 weights, without the gradient hooks
    x, y = torch.randn(256, 16), torch.randn(256, 8)
    micro = list(zip(x.chunk(32), y.chunk(32)))
    for xs, ys in micro:
        _loss(model, xs, ys).backward()
    assert all(p.grad is None for p in model.parameters())  # moved to the masters as they came
    # by hand: each micro-batch's bf16 gradient, summed in float32 in the same order
    by_hand = [torch.zeros_like(m) for m in mw.masters]
    for xs, ys in micro:
        for total, g in zip(by_hand, torch.autograd.grad(_loss(bf16_copy, xs, ys), list(bf16_copy.parameters()))):
            total.add_(g)
    for m, h in zip(mw.masters, by_hand):
        assert m.grad.dtype == torch.float32 and torch.equal(m.grad, h)
    # against the big batch's exact gradient (float64, the same bf16 weights): as close as one big
    # bf16 batch gets, and closer than summing the micro-batches in bf16 gets
    exact = copy.deepcopy(bf16_copy).double()
    _loss(exact, x, y).backward()
    in_bf16 = copy.deepcopy(bf16_copy)
    for xs, ys in micro:
        _loss(in_bf16, xs, ys).backward()

    def error(grads):
        num = sum(float(((g.double() - e.grad) ** 2).sum()) for g, e in zip(grads, exact.parameters()))
        return (num / sum(float((e.grad ** 2).sum()) for e in exact.parameters())) ** 0.5

    assert error([m.grad for m in mw.masters]) < 1e-2
    assert error([m.grad for m in mw.masters]) < 0.6 * error([p.grad for p in in_bf16.parameters()])


def test_clipping_acts_on_the_master_gradients_and_the_step_is_float32_adamw():
    model = _mlp()
    mw = MasterWeights(model)
    opt = make_optimizer(model, RLConfig(lr=1e-2, weight_decay=0.1), False, mw.masters)
    mw.copy_back_after_steps(opt)
    reference = [m.detach().clone() for m in mw.masters]
    _loss(model, torch.randn(32, 16), torch.randn(32, 8)).backward()
    norm = torch.linalg.vector_norm(torch.cat([m.grad.flatten() for m in mw.masters]))
    acc = MasterWeightsAccelerator(cpu=True, mixed_precision="bf16")
    acc.master_weights = mw
    got = acc.clip_grad_norm_(model.parameters(), 0.5 * float(norm))  # run_updates' call, the model's parameters
    assert got.dtype == torch.float32 and float(got) == pytest.approx(float(norm), rel=1e-6)
    clipped = torch.linalg.vector_norm(torch.cat([m.grad.flatten() for m in mw.masters]))
    assert float(clipped) == pytest.approx(0.5 * float(norm), rel=1e-5)
    ref_opt = torch.optim.AdamW(reference, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999))
    for r, m in zip(reference, mw.masters):
        r.grad = m.grad.clone()
    opt.step()
    ref_opt.step()
    for p, m, r in zip(model.parameters(), mw.masters, reference):
        assert torch.equal(m, r)  # AdamW on the float32 masters, as on float32 weights
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), m.to(torch.bfloat16))


def test_no_weight_is_cast_in_the_forward_under_autocast():
    """The point of the flag: float32 weights under bf16 autocast are cast for every product."""
    from torch.profiler import ProfilerActivity, profile

    def weight_casts(model) -> int:
        shapes = {tuple(p.shape) for p in model.parameters()}
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(torch.randn(4, 16))
        return sum(1 for e in prof.events()
                   if e.name == "aten::_to_copy" and e.input_shapes and tuple(e.input_shapes[0]) in shapes)

    assert weight_casts(_mlp()) == 4  # two weights and two biases, each cast once
    bf16 = _mlp()
    MasterWeights(bf16)
    assert weight_casts(bf16) == 0


# ---- in the learner: a tiny policy on the CPU -----------------------------------------------------

def test_off_is_the_float32_learner_of_before(run):
    _, policy, _ = run
    learner = _learner(policy, dtype=None)
    assert learner.master_weights is None and type(learner.acc) is Accelerator
    assert learner.acc.mixed_precision == "no"
    trained = [p for p in learner.model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trained)
    assert learner.opt.param_groups[0]["params"] == trained  # AdamW holds the weights themselves


def test_the_update_computes_with_bf16_weights_and_reports_the_float32_norm(run):
    root, policy, _ = run
    learner = _learner(policy, bf16_weights=True)
    seen = set()
    for m in learner.model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda mod, args: seen.add(mod.weight.dtype))
    norms = []
    clip = learner.master_weights.clip_grad_norm_

    def recording_clip(parameters, max_norm, norm_type=2.0):
        parameters = list(parameters)
        total = clip(parameters, max_norm, norm_type)
        norms.append(float(total))
        return total

    learner.master_weights.clip_grad_norm_ = recording_clip
    grads_before_clip = []
    average = learner.master_weights.average_over_processes

    def note_grads():  # called first in clip_grad_norm_: the masters' gradients as they were summed
        average()
        grads_before_clip.append([m.grad.clone() for m in learner.master_weights.masters])

    learner.master_weights.average_over_processes = note_grads
    samples, rewards = read_batch(root / "gen", root / "rewards")
    metrics = learner.update(samples, rewards).metrics
    assert seen == {torch.bfloat16}
    assert metrics["updates"] == len(norms) == 2 and metrics["skipped_updates"] == 0
    for grads, norm in zip(grads_before_clip, norms):
        assert all(g.dtype == torch.float32 for g in grads)
        flat = torch.cat([g.flatten() for g in grads])  # one vector: another summation order than torch's
        assert norm == pytest.approx(float(torch.linalg.vector_norm(flat)), rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-9)


def test_a_non_finite_gradient_skips_the_update_and_leaves_masters_and_weights(run):
    root, policy, _ = run
    learner = _learner(policy, bf16_weights=True)
    mw = learner.master_weights
    masters, params = [m.clone() for m in mw.masters], [p.detach().clone() for p in mw.params]
    mw.params[3].register_hook(lambda g: torch.full_like(g, float("nan")))
    samples, rewards = read_batch(root / "gen", root / "rewards")
    metrics = learner.update(samples, rewards).metrics
    assert metrics["skipped_updates"] == 2 and metrics["updates"] == 0
    assert all(torch.equal(a, b) for a, b in zip(mw.masters, masters))
    assert all(torch.equal(p.detach(), b) for p, b in zip(mw.params, params))
    assert all(m.grad is None for m in mw.masters) and not learner.opt.state


def test_a_bf16_weights_step_checkpoints_what_a_float32_step_does(run, tmp_path):
    root, policy, _ = run
    s_off = _step(root, policy, tmp_path / "off", dtype=None, beta=0.01)
    s_on = _step(root, policy, tmp_path / "on", beta=0.01, bf16_weights=True)
    off, on = tmp_path / "off", tmp_path / "on"
    assert sorted(p.name for p in off.iterdir()) == sorted(p.name for p in on.iterdir())
    w0, w_off, w_on = (load_file(d / "model.safetensors") for d in (Path(policy), off, on))
    assert w_on.keys() == w_off.keys() and all(v.dtype == torch.float32 for v in w_on.values())
    cfg_off, cfg_on = (json.loads((d / "config.json").read_text()) for d in (off, on))
    assert cfg_on == cfg_off and cfg_on["dtype"] == "float32"
    o_off, o_on = (torch.load(d / "optimizer.pt", weights_only=True) for d in (off, on))
    assert o_on["param_groups"] == o_off["param_groups"] and o_on["state"].keys() == o_off["state"].keys()
    for k, s in o_off["state"].items():
        kinds = {n: (v.dtype, v.shape) for n, v in s.items()}
        assert kinds == {n: (v.dtype, v.shape) for n, v in o_on["state"][k].items()}
    # the same update up to bf16 rounding: AdamW's first steps move every weight by about lr, so a
    # weight whose tiny gradient changes sign under bf16 moves the other way
    moved = sum(float(((w_off[k] - w0[k]) ** 2).sum()) for k in w0) ** 0.5
    apart = sum(float(((w_on[k] - w_off[k]) ** 2).sum()) for k in w0) ** 0.5
    assert moved > 0 and apart < 0.5 * moved
    for k in ("loss", "kl", "grad_norm"):
        assert s_on[k] == pytest.approx(s_off[k], rel=2e-2), k
    assert json.loads((on / "rl3d_policy.json").read_text())["rl_config"]["bf16_weights"] is True


def test_a_step_recorded_before_the_option_is_still_complete_and_the_flag_is_compared(run, tmp_path):
    """rl_step.json of a step made before --bf16-weights existed holds no bf16_weights: a rerun
    without the flag takes it as complete; a rerun with it is refused, never a silent skip."""
    root, policy, _ = run
    out = tmp_path / "step"
    _step(root, policy, out, dtype=None)
    record = json.loads((out / "rl_step.json").read_text())
    del record["config"]["rl"]["bf16_weights"]
    (out / "rl_step.json").write_text(json.dumps(record))
    assert _step(root, policy, out, dtype=None)["skipped"] is True
    with pytest.raises(InputError, match=r"made with another config \(bf16_weights None -> True\)"):
        _step(root, policy, out, bf16_weights=True)


def test_gradient_checkpointing_recomputes_to_the_same_bf16_weights_update(run, tmp_path):
    """The recomputed layers' backward reaches the same float32 masters (the hooks fire there too)."""
    root, policy, _ = run
    _step(root, policy, tmp_path / "plain", bf16_weights=True)
    _step(root, policy, tmp_path / "ckpt", bf16_weights=True, gradient_checkpointing=True)
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "ckpt" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert step_metrics(tmp_path / "ckpt")["grad_norm"] == step_metrics(tmp_path / "plain")["grad_norm"] > 0


def test_save_then_load_resumes_to_the_same_next_update(run, tmp_path):
    """Two rl-steps (the second loads the first's float32 masters and optimizer.pt) equal one
    learner's two updates, to the bit; each mode's optimizer.pt loads into the other."""
    root, policy, _ = run
    _step(root, policy, tmp_path / "s1", bf16_weights=True)
    _step(root, tmp_path / "s1", tmp_path / "s2", allow_off_policy=True, bf16_weights=True)
    learner = _learner(policy, bf16_weights=True)
    for _ in range(2):
        learner.update(*read_batch(root / "gen", root / "rewards"))
    weights, opt_state = learner.full_state()
    saved = load_file(tmp_path / "s2" / "model.safetensors")
    assert all(torch.equal(saved[k], weights[k]) for k in saved)
    saved_opt = torch.load(tmp_path / "s2" / "optimizer.pt", weights_only=True)
    for k, s in saved_opt["state"].items():
        assert all(torch.equal(v, opt_state["state"][k][n]) for n, v in s.items()), k
    # a float32 run's optimizer.pt into a bf16-weights learner, and the other way round
    _step(root, policy, tmp_path / "f1", dtype=None)
    for parent, kw, dtype in ((tmp_path / "f1", {"bf16_weights": True}, "bfloat16"), (tmp_path / "s1", {}, None)):
        loaded = _learner(parent, dtype=dtype, **kw).full_state()[1]
        written = torch.load(parent / "optimizer.pt", weights_only=True)
        assert _groups(loaded) == _groups(written)
        for k, s in written["state"].items():
            assert all(torch.equal(v, loaded["state"][k][n]) for n, v in s.items()), (parent.name, k)


def _groups(opt_state: dict) -> list[dict]:
    """param_groups with betas as a tuple: torch's named-state loader (the float32 path) leaves a list."""
    return [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in opt_state["param_groups"]]


def test_a_train_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(run, tmp_path):
    """rl3d train with --bf16-weights: 2 steps straight through, and the same run carried as its
    step-1 checkpoint (float32 masters, optimizer.pt) and resumed, end at the same weights to the
    bit; resuming it without the flag is refused."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    _, policy, _ = run
    # synth prompts and terms that read the voxel grid only: rewards with spread, no renders
    rewards = tmp_path / "voxels.toml"
    rewards.write_text('name = "voxels"\ndescription = "spec and geometry"\n' + "".join(
        f'[[levels.{level}]]\nname = "{term}"\nbackend = "{backend}"\nweight = 1.0\naggregate = "none"\n'
        for level in ("coarse", "fine") for term, backend in (("spec", "spec"), ("non_degenerate", "geometry"))))

    def train(out, *extra):
        fresh_accelerate_state()
        return CliRunner().invoke(main, [
            "train", "--prompts", "synth", "--policy", str(policy), "--out", str(out), "--steps", "2",
            "--prompts-per-step", "2", "-G", "2", "--max-reasoning-tokens", "6", "--no-meshes", "--rewards",
            str(rewards), "--lr", "1e-3", "--micro-batch", "4", "--save-every", "1", "--keep-checkpoints", "0",
            "--quiet", "--dtype", "bfloat16", *extra])

    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    assert (r := train(ref, "--bf16-weights")).exit_code == 0, r.output
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(ref / "train.json", resumed / "train.json")
    metrics = pq.read_table(ref / "metrics.parquet")
    pq.write_table(metrics.filter(pc.equal(metrics.column("step"), 1)), resumed / "metrics.parquet")
    shutil.copytree(ref / "checkpoints" / "step-000001", resumed / "checkpoints" / "step-000001")
    assert (r := train(resumed, "--bf16-weights")).exit_code == 0, r.output
    w1, wa, wb = (load_file(d / "model.safetensors") for d in
                  (ref / "checkpoints" / "step-000001", ref / "checkpoints" / "step-000002",
                   resumed / "checkpoints" / "step-000002"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(v.dtype == torch.float32 for v in wa.values()) and any(not torch.equal(wa[k], w1[k]) for k in w1)
    r = train(resumed, "--no-bf16-weights")
    assert r.exit_code == 2 and "rl.bf16_weights: True -> (default)" in _one_error_line(r.output)


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_refused_combinations_exit_2_with_one_line(run, tmp_path):
    root, policy, _ = run
    step = ["rl-step", "--policy", str(policy), "--samples", str(root / "gen"), "--rewards", str(root / "rewards"),
            "--quiet", "--bf16-weights"]
    for extra, says in (([], "--bf16-weights: the weights are kept in bf16 for bf16 compute"),
                        (["--dtype", "float32"], "--bf16-weights: the weights are kept in bf16 for bf16 compute"),
                        (["--dtype", "bfloat16", "--lora-rank", "2"], "--bf16-weights with --lora-rank")):
        fresh_accelerate_state()
        out = tmp_path / f"o{len(extra)}"
        r = CliRunner().invoke(main, step + extra + ["--out", str(out)])
        assert r.exit_code == 2 and says in _one_error_line(r.output), r.output
        assert not out.exists()
    fresh_accelerate_state()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_id": "p", "prompt": "a red chair"}) + "\n")
    r = CliRunner().invoke(main, ["train", "--prompts", str(prompts), "--policy", str(policy), "--out",
                                  str(tmp_path / "run"), "--steps", "1", "--bf16-weights", "--quiet"])
    assert r.exit_code == 2 and "--bf16-weights: the weights are kept in bf16" in _one_error_line(r.output)
    assert not (tmp_path / "run" / "train.json").exists()
    with pytest.raises(InputError, match=r"^--bf16-weights under FSDP: not supported"):
        check_setup(True, 0, DistributedType.FSDP)
    for command in ("rl-step", "train"):
        help_text = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
        assert "--bf16-weights / --no-bf16-weights" in help_text
        assert "Not yet measured on a GPU, hence off by default" in help_text


# process 1 starts from other weights than process 0, as an FSDP-style launch can leave them
# (transformers up to 5.17 read the weights on process 0 only): each process must end at process 0's
SCRAMBLED_PROCESS_1_LAUNCHER = """
import os, sys, torch
from rl3d.stages.rl import learner
_load = learner.load_policy
def load_scrambled_on_process_1(*a, **k):
    policy = _load(*a, **k)
    if os.environ.get("RANK") == "1":
        with torch.no_grad():
            for p in policy.model.parameters():
                p.normal_()
    return policy
learner.load_policy = load_scrambled_on_process_1
from rl3d.cli.main import main
main(sys.argv[1:])
"""


def test_two_process_ddp_averages_the_master_gradients_like_one_process(tmp_path):
    """2 gloo processes (process 1 loading other weights), a 5-row minibatch split 3/2: the same
    updates and weights as one process, within bf16 rounding. Measured as a fraction of the
    update's size: 0.015 apart, under one process's own spread at another micro-batch (0.020);
    without the float32 average over processes 1.05, without the masters' broadcast 1.5."""
    root, policy, _ = rl_batch(tmp_path, tied=True)
    args = ["rl-step", "--policy", str(policy), "--samples", str(root / "gen"), "--rewards", str(root / "rewards"),
            "--lr", "1e-3", "--minibatch", "5", "--micro-batch", "2", "--beta", "0.05", "--device", "cpu", "--quiet",
            "--bf16-weights", "--dtype", "bfloat16"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    launcher = tmp_path / "launch.py"
    launcher.write_text(SCRAMBLED_PROCESS_1_LAUNCHER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
           *args, "--out", str(tmp_path / "two")]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    m1, m2 = step_metrics(tmp_path / "one"), step_metrics(tmp_path / "two")
    assert m1["updates"] == m2["updates"] == 3 and m2["skipped_updates"] == 0
    for k in ("loss", "kl", "grad_norm", "ratio_mean"):
        assert m2[k] == pytest.approx(m1[k], rel=2e-2), k
    w0, w1, w2 = (load_file(p / "model.safetensors") for p in (Path(policy), tmp_path / "one", tmp_path / "two"))
    assert w0.keys() == w1.keys() == w2.keys() and "lm_head.weight" not in w2
    moved = sum(float(((w1[k] - w0[k]) ** 2).sum()) for k in w1) ** 0.5
    apart = sum(float(((w1[k] - w2[k]) ** 2).sum()) for k in w1) ** 0.5
    assert moved > 0 and apart < 0.15 * moved


def test_train_records_bf16_weights_only_when_on(tmp_path):
    """A run made before the option resumes unchanged: its train.json has no rl.bf16_weights, and
    neither has a run's record with the option off."""
    import dataclasses

    from rl3d.stages.rl.rl_config import RLConfig
    from rl3d.stages.train import TrainOptions

    off = TrainOptions(prompts="synth", out=tmp_path / "run").settings()
    on = TrainOptions(prompts="synth", out=tmp_path / "run", rl=dataclasses.replace(RLConfig(), bf16_weights=True)).settings()
    assert "bf16_weights" not in off["rl"] and on["rl"]["bf16_weights"] is True
