"""`rl3d rl-step` on a tiny random policy: first-update ratio, KL, clipping, checkpoints, resume."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import rl_batch, run_step, step_metrics

from rl3d.cli.main import main
from rl3d.formats import shards, tables
from rl3d.formats.errors import InputError
from rl3d.stages.policy.checkpoint import load_policy
from rl3d.stages.rl.rl_config import RLConfig
from rl3d.stages.rl.loss import warmup_lr
from rl3d.stages.rl_step import run_rl_step

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny policy, a hi-grpo samples table from it and a rewards table scoring each sample by the
    fraction of non-empty mesh blocks (any deterministic function with spread will do)."""
    return rl_batch(tmp_path_factory.mktemp("rl"))


def test_first_update_has_ratio_one_and_loss_equals_negative_weighted_advantage(run, tmp_path):
    root, policy, rows = run
    s = run_step(root, policy, tmp_path / "a", beta=0.0)
    m = step_metrics(tmp_path / "a")
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # stored log-probs == recomputed
    assert m["clip_low_frac"] == 0.0 and m["clip_high_frac"] == 0.0
    assert "kl" not in m  # beta 0 loads no reference, so no KL is measured (not a 0 that looks measured)
    adv = {r["sample_id"]: r["advantage"] for r in
           tables.read_table(tmp_path / "a" / "advantages", "advantages").to_pylist()}
    expected = 0.0
    for level in ("coarse", "fine"):
        lv = [r for r in rows if r["level"] == level]
        n = [r["mesh_end"] - r["prompt_len"] - int(r["reasoning_truncated"]) for r in lv]  # tokens with a choice
        expected += -sum(adv[r["sample_id"]] * k for r, k in zip(lv, n)) / sum(n)
    assert s["loss"] == pytest.approx(expected, abs=1e-5)


def test_checkpoint_is_complete_and_loadable(run, tmp_path):
    root, policy, _ = run
    out = tmp_path / "ckpt"
    run_step(root, policy, out, beta=0.01)
    for f in ("model.safetensors", "tokenizer.json", "rl3d_policy.json", "optimizer.pt", "rng_state.pt", "rl_step.json"):
        assert (out / f).exists(), f
    meta = json.loads((out / "rl3d_policy.json").read_text())
    assert meta["rl_step"] == 1 and meta["initial_policy"] == str(Path(policy).resolve())
    # the checkpoint is at RL step 1 (its id says so), and keeps the SFT step it started from (3)
    assert meta["step"] == 1 and meta["sft_step"] == 3
    assert step_metrics(out)["kl"] == 0.0  # the first step's policy is its own reference
    loaded = load_policy(out, device="cpu", dtype="float32")
    assert loaded.meta["rl_step"] == 1 and loaded.step == 1
    assert loaded.policy_id.startswith(f"{out.resolve()}@") and loaded.policy_id.endswith("#step1")
    run_metrics = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert {r["name"] for r in run_metrics} >= {"loss", "kl", "entropy", "reward_mean_coarse", "grad_norm"}
    # a second step from the first: its reference is still the initial policy, so KL > 0 now
    # (on the first step's samples: another policy drew them, which rl-step refuses unless told)
    with pytest.raises(InputError, match="pass --allow-off-policy"):
        run_step(root, out, tmp_path / "ckpt2", beta=0.01)
    samples_meta = run_step(root, out, tmp_path / "ckpt2", beta=0.01, allow_off_policy=True)
    assert samples_meta["step"] == 2 and step_metrics(tmp_path / "ckpt2")["kl"] > 0
    meta2 = json.loads((tmp_path / "ckpt2" / "rl3d_policy.json").read_text())
    assert (meta2["step"], meta2["rl_step"], meta2["sft_step"]) == (2, 2, 3)
    assert {r["step"] for r in pq.read_table(tmp_path / "m.parquet").to_pylist()} == {1, 2}


def test_rerun_is_skipped_and_interrupted_run_reproduces_uninterrupted(run, tmp_path):
    root, policy, _ = run
    run_step(root, policy, tmp_path / "x", beta=0.01, epochs=2, minibatch=6)
    assert run_step(root, policy, tmp_path / "x", beta=0.01, epochs=2, minibatch=6)["skipped"] is True
    # an interrupted run leaves only a temp dir; rerunning gives the uninterrupted parameters
    (tmp_path / ".y.rl-tmp").mkdir()
    (tmp_path / ".y.rl-tmp" / "model.safetensors").write_bytes(b"torn")
    run_step(root, policy, tmp_path / "y", beta=0.01, epochs=2, minibatch=6)
    a, b = load_file(tmp_path / "x" / "model.safetensors"), load_file(tmp_path / "y" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(Path(policy) / "model.safetensors")
    assert any(not torch.equal(a[k], base[k].to(a[k].dtype)) for k in a)  # the update changed the weights


def test_clipping_engages_after_the_policy_moved(run, tmp_path):
    root, policy, _ = run
    run_step(root, policy, tmp_path / "c", beta=0.0, epochs=4, minibatch=4, lr=3e-2)
    m = step_metrics(tmp_path / "c")
    assert m["updates"] == 12 and m["clip_low_frac"] + m["clip_high_frac"] > 0


def test_warmup_ramps_the_lr_across_steps():
    assert [warmup_lr(1e-3, u, 4) for u in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert warmup_lr(1e-3, 0, 0) == 1e-3


def test_warmup_continues_from_the_parent_checkpoint(run, tmp_path):
    root, policy, _ = run
    run_step(root, policy, tmp_path / "w1", beta=0.0, minibatch=6, warmup_updates=8)  # 12 samples: 2 updates
    m1 = step_metrics(tmp_path / "w1")
    assert m1["optimizer_updates"] == 2 and m1["lr"] == pytest.approx(1e-3 * (1 + 2) / 2 / 8)
    assert json.loads((tmp_path / "w1" / "rl3d_policy.json").read_text())["optimizer_updates"] == 2
    run_step(root, tmp_path / "w1", tmp_path / "w2", beta=0.0, minibatch=6, warmup_updates=8, allow_off_policy=True)
    m2 = step_metrics(tmp_path / "w2")
    assert m2["optimizer_updates"] == 4 and m2["lr"] == pytest.approx(1e-3 * (3 + 4) / 2 / 8)
    # AdamW's state carries over too: named by parameter, its step count continues from the parent
    o1, o2 = (torch.load(tmp_path / d / "optimizer.pt", weights_only=True)["state"] for d in ("w1", "w2"))
    assert o1.keys() == o2.keys() and all(isinstance(k, str) for k in o1)
    assert {float(v["step"]) for v in o1.values()} == {2.0} and {float(v["step"]) for v in o2.values()} == {4.0}


def test_cli_errors_and_dynamic_sampling(run, tmp_path):
    root, policy, _ = run
    r = CliRunner().invoke(main, ["rl-step", "--policy", str(policy), "--samples", str(root / "gen"),
                                  "--rewards", str(root / "rewards"), "--out", str(tmp_path / "o"),
                                  "--dynamic-sampling", "min-std:abc"])
    assert r.exit_code == 2 and "min-std:X" in r.output
    r = CliRunner().invoke(main, ["rl-step", "--policy", str(tmp_path / "nope"), "--samples", str(root / "gen"),
                                  "--rewards", str(root / "rewards"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "nope" in r.output
    r = CliRunner().invoke(main, ["rl-step", "--policy", str(policy), "--samples", str(root / "gen"),
                                  "--rewards", str(root / "rewards"), "--out", str(tmp_path / "o"), "--beta", "0",
                                  "--dynamic-sampling", "min-std:100", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["kept_samples"] == 0 and summary["dropped_groups"] == 4  # 2 prompts x 2 levels


def test_train_levels_trains_one_level_only(run, tmp_path):
    root, policy, rows = run
    r = CliRunner().invoke(main, ["rl-step", "--policy", str(policy), "--samples", str(root / "gen"),
                                  "--rewards", str(root / "rewards"), "--out", str(tmp_path / "fine"),
                                  "--train-levels", "fine", "--micro-batch", "4", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["kept_samples"] == sum(x["level"] == "fine" for x in rows)
    adv = tables.read_table(tmp_path / "fine" / "advantages", "advantages").to_pylist()
    assert {a["level"] for a in adv if a["kept"]} == {"fine"}
    r = CliRunner().invoke(main, ["rl-step", "--policy", str(policy), "--samples", str(root / "gen"),
                                  "--rewards", str(root / "rewards"), "--out", str(tmp_path / "x"),
                                  "--train-levels", "fine", "--algo", "grpo"])
    assert r.exit_code == 2 and "only --algo hi-grpo has levels" in r.output


def test_two_process_ddp_matches_one_process(run, tmp_path):
    """DDP on CPU (gloo, torchrun): each process takes every 2nd sequence of a minibatch, yet the
    gradients, the update and the step's diagnostics equal the single-process step's."""
    import os
    import subprocess

    root, policy, _ = run
    one = tmp_path / "one"
    run_step(root, policy, one, minibatch=4)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rl3d.cli.main", "rl-step", "--policy", str(policy), "--samples", str(root / "gen"),
           "--rewards", str(root / "rewards"), "--out", str(two), "--lr", "1e-3", "--micro-batch", "4",
           "--minibatch", "4", "--device", "cpu", "--run-metrics", str(tmp_path / "m2.parquet"), "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    m1, m2 = step_metrics(one), step_metrics(two)
    assert m1["updates"] == m2["updates"] == 3
    for k in ("loss", "pg_loss", "kl", "grad_norm", "ratio_mean", "entropy"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
    g1 = torch.load(one / "optimizer.pt", weights_only=True)["state"]
    g2 = torch.load(two / "optimizer.pt", weights_only=True)["state"]
    num = sum(float(((g1[k]["exp_avg"] - g2[k]["exp_avg"]) ** 2).sum()) for k in g1)
    den = sum(float((g1[k]["exp_avg"] ** 2).sum()) for k in g1)
    assert (num / den) ** 0.5 < 1e-4  # the gradient history agrees to float32 summation order
    w0, w1, w2 = (load_file(p / "model.safetensors") for p in (Path(policy), one, two))
    moved = sum(float(((w1[k] - w0[k]) ** 2).sum()) for k in w1) ** 0.5
    apart = sum(float(((w1[k] - w2[k]) ** 2).sum()) for k in w1) ** 0.5
    assert moved > 0 and apart < 1e-2 * moved


# what `accelerate launch --config_file examples/accelerate/fsdp.yaml` sets for every process;
# FSDP itself needs GPUs, so on CPU the processes run DDP and load the way an FSDP launch loads
FSDP_LOADING_LAUNCHER = """
import os, sys
import accelerate
_init = accelerate.Accelerator.__init__
def _init_then_fsdp_loading(self, *a, **k):
    _init(self, *a, **k)
    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true")
accelerate.Accelerator.__init__ = _init_then_fsdp_loading
from rl3d.cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_two_processes_with_fsdp_loading_and_uneven_splits_match_one_process(tmp_path, tied):
    """2 CPU processes, loading as under an FSDP launch (transformers then reads the weights on
    process 0 only and leaves the other processes' uninitialised for FSDP to broadcast; versions
    up to at least 5.17 do), 12 samples in minibatches of 5 and micro-batches of 2 (a 5-row
    minibatch splits 3/2, so process 1 runs an empty micro-batch): the same updates, metrics and
    weights as one process. Before the fix process 1 scored the KL against an uninitialised
    reference (KL 0.82 instead of 0.0003 here). A tied policy's checkpoint stays tied."""
    import os
    import subprocess

    root, policy, _ = rl_batch(tmp_path, tied=tied)
    args = ["--policy", str(policy), "--samples", str(root / "gen"), "--rewards", str(root / "rewards"),
            "--lr", "1e-3", "--minibatch", "5", "--micro-batch", "2", "--beta", "0.05", "--device", "cpu", "--quiet"]
    r = CliRunner().invoke(main, ["rl-step", *args, "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    launcher = tmp_path / "launch.py"
    launcher.write_text(FSDP_LOADING_LAUNCHER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
           "rl-step", *args, "--out", str(tmp_path / "two")]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    m1, m2 = step_metrics(tmp_path / "one"), step_metrics(tmp_path / "two")
    assert m1["updates"] == m2["updates"] == 3 and m2["skipped_updates"] == 0
    for k in ("loss", "pg_loss", "kl", "grad_norm", "ratio_mean"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
    w0, w1, w2 = (load_file(p / "model.safetensors") for p in (Path(policy), tmp_path / "one", tmp_path / "two"))
    assert w0.keys() == w1.keys() == w2.keys()
    assert ("lm_head.weight" in w2) is not tied
    assert json.loads((tmp_path / "two" / "config.json").read_text())["tie_word_embeddings"] is tied
    moved = sum(float(((w1[k] - w0[k]) ** 2).sum()) for k in w1) ** 0.5
    apart = sum(float(((w1[k] - w2[k]) ** 2).sum()) for k in w1) ** 0.5
    assert moved > 0 and apart < 1e-3 * moved


def test_lora_step_merges_the_adapter_into_a_plain_checkpoint(run, tmp_path):
    pytest.importorskip("peft")
    root, policy, _ = run
    out = tmp_path / "lora"
    cfg = RLConfig(lr=1e-2, micro_batch=4, beta=0.01)
    run_rl_step(policy, root / "gen", root / "rewards", out, cfg, run_metrics=str(tmp_path / "m.parquet"), lora_rank=4)
    w0, w1 = load_file(Path(policy) / "model.safetensors"), load_file(out / "model.safetensors")
    assert w0.keys() == w1.keys()  # merged: no adapter weights left
    assert any(not torch.equal(w0[k].to(w1[k].dtype), w1[k]) for k in w1)
    assert not (out / "optimizer.pt").exists()
    assert load_policy(out, device="cpu", dtype="float32").model is not None


def plain_weights(policy) -> dict:
    return load_policy(policy, device="cpu", dtype="float32").model.state_dict()


def test_lora_reference_is_the_base_with_the_adapter_off(run):
    """A LoRA learner scores the reference with its own frozen base (no second copy loaded): the
    same log-probs as the initial policy read from disk, while the adapted policy's differ."""
    pytest.importorskip("peft")
    from rl3d.stages.policy.sampler import CompletionLogprobs
    from rl3d.stages.rl.learner import BaseLogprobs, Learner, read_batch
    from rl3d.stages.rl.update import reference_logprobs

    root, policy, _ = run
    learner = Learner(policy, RLConfig(lr=1e-2, micro_batch=4), device="cpu", lora_rank=4)
    with torch.no_grad():
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # the adapter has moved: the policy is no longer its base
    samples = [s for s in read_batch(root / "gen", root / "rewards")[0] if s["status"] == "ok"][:4]
    ref = learner.reference()
    assert isinstance(ref, BaseLogprobs)
    plain = CompletionLogprobs(load_policy(policy, device="cpu", dtype="float32").model.eval(), learner.special, 1.0)
    trained = CompletionLogprobs(learner.model, learner.special, 1.0)
    got = {}
    for label, scorer in (("ref", ref), ("plain", plain), ("trained", trained)):
        rows = [dict(s) for s in samples]
        reference_logprobs(rows, scorer, learner.special, learner.acc, 4, False)
        got[label] = torch.cat([torch.as_tensor(r["ref_logp"]) for r in rows])
    assert torch.allclose(got["ref"], got["plain"], atol=1e-5)
    assert not torch.allclose(got["trained"], got["plain"], atol=1e-3)
    # the sampling copy: the merged weights copied in place, tensor by tensor
    copy = load_policy(policy, device="cpu", dtype="float32").model
    learner.copy_merged_into(copy)
    merged = learner.merged_weights()
    state = copy.state_dict()
    assert merged.keys() == state.keys()
    assert all(torch.equal(state[k], merged[k]) for k in merged)
    assert any(not torch.equal(state[k], w) for k, w in plain_weights(policy).items())


def test_rewards_of_another_run_do_not_join(run, tmp_path):
    """Sample ids repeat from run to run: step 1's rewards must not train on step 2's rollouts."""
    root, policy, rows = run
    other = tmp_path / "other-rewards"
    t = tables.read_table(root / "rewards", "rewards")
    made_from = {"samples": tables.table_id("samples", {"prompts": "RL_PROMPTS", "seed": 4}, "another run")}
    shards.write_part(tables.with_metadata(t, "rewards", {"reward": "mesh fill"}, None, made_from), other,
                      shards.Shard(0, 1))
    with pytest.raises(InputError, match="was made from another samples table .* do not join"):
        run_rl_step(policy, root / "gen", other, tmp_path / "x", RLConfig(lr=1e-3))
    res = CliRunner().invoke(main, ["rl-step", "--policy", str(policy), "--samples", str(root / "gen"),
                                    "--rewards", str(other), "--out", str(tmp_path / "y")])
    assert res.exit_code == 2 and "do not join" in res.output and not (tmp_path / "y").exists()


def test_cli_writes_tensorboard_scalars_beside_the_run_metrics(run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, policy, rows = run
    res = CliRunner().invoke(main, ["rl-step", "--policy", str(policy), "--samples", str(root / "gen"),
                                    "--rewards", str(root / "rewards"), "--out", str(tmp_path / "o"), "--lr", "1e-3",
                                    "--tensorboard", str(tmp_path / "tb")])
    assert res.exit_code == 0, res.output
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"loss", "kl", "grad_norm"} <= set(acc.Tags()["scalars"]) and acc.Scalars("loss")[0].step == 1
    assert "rl-step: reference log-probs" in res.output and "writing the checkpoint" in res.output


def test_kill_after_the_checkpoint_rename_loses_no_run_metrics(run, tmp_path):
    root, policy, rows = run
    run_step(root, policy, tmp_path / "a", beta=0.0)
    (tmp_path / "m.parquet").unlink()  # as if killed between the rename and the run-metrics append
    assert run_step(root, policy, tmp_path / "a", beta=0.0)["skipped"] is True
    assert {r["step"] for r in pq.read_table(tmp_path / "m.parquet").to_pylist()} == {1}


def test_an_existing_incomplete_out_fails_before_training(run, tmp_path):
    root, policy, rows = run
    (tmp_path / "p").mkdir()
    with pytest.raises(InputError, match="is not a complete rl-step checkpoint"):
        run_step(root, policy, tmp_path / "p")
    assert not (tmp_path / ".p.rl-tmp").exists() and not (tmp_path / "m.parquet").exists()


def test_a_killed_run_metrics_write_leaves_no_file_a_reader_takes(tmp_path):
    from rl3d.stages.rl_step import append_run_metrics
    from rl3d.stages.scoring.run_metrics import read_run_metrics

    stale = tmp_path / ".tmp-999-metrics.parquet"
    stale.write_bytes(b"PAR1 torn")
    rows = pa.table({"step": pa.array([1], pa.int64()), "name": ["loss"], "value": [0.5]})
    append_run_metrics(tmp_path / "metrics.parquet", rows)
    assert not stale.exists() and read_run_metrics(tmp_path)["loss"] == ([1.0], [0.5])


def test_suspect_rows_hold_every_row_sample_problem_refuses():
    """check_step_inputs checks the samples column by column (inputs.suspect_rows) and only the
    suspects row by row: the suspects are exactly the rows sample_problem refuses, on tables with
    every kind of defect, so the error names the same first row as a row-by-row scan."""
    import math
    import random

    import pyarrow as pa

    from rl3d.stages.rl.inputs import sample_problem, suspect_rows

    rng = random.Random(7)

    def row(i):
        plen, n = rng.randint(1, 6), rng.randint(8, 20)
        ids = [rng.randrange(50) for _ in range(plen + n)]
        r = {"sample_id": f"s{i}", "input_ids": ids, "prompt_len": plen, "reasoning_start": plen,
             "reasoning_end": plen + 2, "mesh_start": plen + 3, "mesh_end": plen + n - 1,
             "logprobs": [-0.5] * n, "status": "ok"}
        defect = rng.randrange(12)
        if defect == 0:
            r["input_ids"][rng.randrange(len(ids))] = 50 + rng.randrange(3)       # outside the vocabulary
        elif defect == 1:
            r["input_ids"][0] = -1
        elif defect == 2:
            r["logprobs"][rng.randrange(n)] = rng.choice([math.nan, math.inf, None])
        elif defect == 3:
            r["logprobs"] = r["logprobs"][:-1]                                      # one short
        elif defect == 4:
            r["reasoning_end"], r["mesh_start"] = r["mesh_start"], r["reasoning_end"]  # out of order
        elif defect == 5:
            r["mesh_end"] = None
        elif defect == 6:
            r["prompt_len"] = len(ids) + rng.randrange(2)                            # past the sequence
        elif defect == 7:
            r["input_ids"] = r["input_ids"] + [1] * 20                                # past max positions
        elif defect == 8:  # a failed row: spans and log-prob counts are not checked, finiteness is
            r.update(status="decode_error", mesh_end=None, logprobs=r["logprobs"][:2])
        elif defect == 9:
            r.update(status="decode_error", input_ids=[], prompt_len=0, logprobs=[])
        return r

    for trial in range(20):
        rows = [row(i) for i in range(rng.randint(1, 40))]
        table = pa.Table.from_pylist(rows)
        refused = [i for i, r in enumerate(table.to_pylist()) if sample_problem(r, 50, 30)]
        assert suspect_rows(table, 50, 30) == refused
        cut = len(rows) // 2  # a table read from several parts holds several chunks
        assert suspect_rows(pa.concat_tables([table.slice(0, cut), table.slice(cut)]), 50, 30) == refused
        assert suspect_rows(table, None, None) == [i for i, r in enumerate(table.to_pylist())
                                                   if sample_problem(r, None, None)]
