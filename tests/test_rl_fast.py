"""rl-step's pi_old choice (--old-logprobs), the training/inference mismatch metrics, length-bucketed
micro-batches, chunked log-probs and the step's timers, on a tiny random policy."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import rl_batch, run_step, step_metrics

from rl3d.cli.main import main
from rl3d.formats import shards, tables
from rl3d.formats.errors import InputError
from rl3d.stages.policy.checkpoint import load_policy
from rl3d.stages.policy.sampler import completion_logprobs, token_logprobs
from rl3d.stages.policy.sequence import collate
from rl3d.stages.rl.rl_config import RLConfig
from rl3d.stages.rl.loss import logprob_mismatch, mismatch_metrics
from rl3d.stages.rl.update import by_length
from rl3d.stages.rl_step import TIMERS, make_optimizer, set_fused, use_fused_adamw

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return rl_batch(tmp_path_factory.mktemp("rlfast"))


def _weights(out):
    return load_file(out / "model.safetensors")


def _plain_logprobs(model, b, special):
    """The unchunked reference: full [B, L, V] logits, then the sampler's masked log-softmax."""
    from rl3d.stages.policy.sampler import position_ids_from_mask
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   position_ids=position_ids_from_mask(b["attention_mask"]), use_cache=False).logits
    P = int(b["prompt_lens"].max())
    T = b["kinds"].shape[1]
    return token_logprobs(logits[:, P - 1:P - 1 + T], b["kinds"], b["input_ids"][:, P:P + T], special, 1.0)


def test_chunked_logprobs_equal_plain_log_softmax_with_and_without_grad(run):
    root, policy, rows = run
    pol = load_policy(policy, device="cpu", dtype="float32")
    rows = [{**r, "reasoning_truncated": r["reasoning_truncated"]} for r in rows[:6]]
    b = collate(rows, pol.special)
    plain = _plain_logprobs(pol.model, b, pol.special)
    with torch.no_grad():  # the reference / recompute path
        chunked, _ = completion_logprobs(pol.model, b["input_ids"], b["attention_mask"], b["prompt_lens"],
                                         b["kinds"], pol.special, chunk_size=5)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain.detach(), atol=1e-5, rtol=0)
    # the update path (head and log-softmax per chunk under checkpointing): same values and gradients
    grad_chunked, _ = completion_logprobs(pol.model, b["input_ids"], b["attention_mask"], b["prompt_lens"],
                                          b["kinds"], pol.special, chunk_size=7)
    torch.testing.assert_close(grad_chunked.detach(), plain.detach(), atol=1e-5, rtol=0)
    params = [p for p in pol.model.parameters() if p.requires_grad]
    g_plain = torch.autograd.grad(plain.sum(), params)
    g_chunked = torch.autograd.grad(grad_chunked.sum(), params)
    for a, c in zip(g_plain, g_chunked):  # equal up to float summation order (the head's rows per kind)
        assert (c - a).abs().max() <= 1e-5 * a.abs().max() + 1e-7


def test_right_padded_batches_need_no_attention_mask_and_give_the_same_logprobs_and_gradients(run, monkeypatch):
    """The update's layout: every sequence at column 0, pads only after it. No padding mask reaches
    attention (its plain causal kernel), and log-probs and gradients equal the left-padded batch's."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    root, policy, rows = run
    pol = load_policy(policy, device="cpu", dtype="float32")
    rows = rows[:6]
    assert len({len(r["input_ids"]) for r in rows}) > 1 and len({r["prompt_len"] for r in rows}) >= 1
    masks = []

    def spy(module, q, k, v, attention_mask, **kw):
        masks.append(attention_mask)
        return sdpa_attention_forward(module, q, k, v, attention_mask, **kw)

    AttentionInterface.register("rl3d_spy", spy)
    AttentionMaskInterface.register("rl3d_spy", sdpa_mask)  # the masks sdpa gets
    pol.model.set_attn_implementation("rl3d_spy")
    params = [p for p in pol.model.parameters() if p.requires_grad]
    out = {}
    for layout in (False, True):
        b = collate(rows, pol.special, right_padded=layout)
        masks.clear()
        lp, real = completion_logprobs(pol.model, b["input_ids"], b["attention_mask"], b["prompt_lens"],
                                       b["kinds"], pol.special)
        out[layout] = (lp, real, torch.autograd.grad(lp.sum(), params), b["input_ids"].shape[1], masks[:])
    left, right = out[False], out[True]
    assert all(m is not None for m in left[4]) and all(m is None for m in right[4])
    assert right[3] == max(len(r["input_ids"]) for r in rows) <= left[3]
    assert torch.equal(left[1], right[1])
    torch.testing.assert_close(right[0].detach(), left[0].detach(), atol=1e-5, rtol=0)
    for a, c in zip(left[2], right[2]):
        assert (c - a).abs().max() <= 1e-5 * a.abs().max() + 1e-7


def test_recompute_on_fp32_cpu_has_no_mismatch_and_gives_the_stored_update(run, tmp_path):
    root, policy, _ = run
    s_stored = run_step(root, policy, tmp_path / "stored", beta=0.01, minibatch=6)
    s_recomp = run_step(root, policy, tmp_path / "recompute", beta=0.01, minibatch=6, old_logprobs="recompute")
    for s, out in ((s_stored, "stored"), (s_recomp, "recompute")):
        m = step_metrics(tmp_path / out)
        assert m["mismatch_abs_mean"] < 1e-5 and m["mismatch_abs_max"] < 1e-4, out
        assert m["mismatch_clip_frac"] == 0.0 and m["mismatch_tokens"] > 0
        assert s["mismatch_abs_max"] == m["mismatch_abs_max"]
    # stored measures the first minibatch (6 rows), recompute every kept row
    assert step_metrics(tmp_path / "recompute")["mismatch_tokens"] > step_metrics(tmp_path / "stored")["mismatch_tokens"]
    a, b = _weights(tmp_path / "stored"), _weights(tmp_path / "recompute")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    assert step_metrics(tmp_path / "recompute")["loss"] == pytest.approx(step_metrics(tmp_path / "stored")["loss"], abs=1e-5)
    meta = json.loads((tmp_path / "recompute" / "rl3d_policy.json").read_text())
    assert meta["rl_config"]["old_logprobs"] == "recompute"
    assert tables.table_config(tmp_path / "recompute" / "metrics")["rl"]["old_logprobs"] == "recompute"


def _perturbed_samples(root, rows, dst, delta):
    """The samples table with one choice token's stored log-prob moved by `delta` (same provenance)."""
    rows = [dict(r) for r in rows]
    r = rows[0]
    j = r["mesh_start"] + 2 - r["prompt_len"]  # a mesh token: carries a choice
    r["logprobs"] = list(r["logprobs"])
    r["logprobs"][j] += delta
    src = tables.provenance(root / "gen")
    t = tables.read_table(root / "gen", "samples")
    new = pa.Table.from_pylist(rows, schema=t.schema)
    shards.write_part(tables.with_metadata(new, "samples", tables.table_config(root / "gen"), src.policy), dst,
                      shards.Shard(0, 1))
    return dst


@pytest.mark.parametrize("mode", ["stored", "recompute"])
def test_a_perturbed_stored_logprob_shows_in_the_mismatch(run, tmp_path, mode):
    root, policy, rows = run
    samples = _perturbed_samples(root, rows, tmp_path / "gen", 1.0)
    cfg = RLConfig(lr=1e-3, micro_batch=4, beta=0.0, old_logprobs=mode)
    from rl3d.stages.rl_step import run_rl_step
    s = run_rl_step(policy, samples, root / "rewards", tmp_path / "out", cfg, run_metrics=str(tmp_path / "m.parquet"))
    m = step_metrics(tmp_path / "out")
    assert m["mismatch_abs_max"] == pytest.approx(1.0, abs=1e-4)
    assert m["mismatch_clip_frac"] == pytest.approx(1.0 / m["mismatch_tokens"])  # exp(-1) < 1 - 0.2
    assert m["mismatch_abs_mean"] == pytest.approx(1.0 / m["mismatch_tokens"], abs=1e-5)
    assert s["mismatch_clip_frac"] == m["mismatch_clip_frac"]
    if mode == "recompute":  # pi_old is the recomputed one: the first update's ratio is exactly 1
        assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["clip_low_frac"] == 0.0
    else:  # the perturbed token's ratio is exp(-1): clipped when its advantage is negative
        assert m["ratio_mean"] < 1.0


def test_mismatch_sums_and_metrics():
    train = torch.tensor([[0.0, -1.0, -2.0, 0.0]])
    gen = torch.tensor([[0.1, -1.0, -2.5, 5.0]])
    mask = torch.tensor([[True, True, True, False]])  # the last position carries no choice
    sums = logprob_mismatch(train, gen, mask, 0.2, 0.28)
    assert sums["tokens"] == 3 and sums["abs_sum"] == pytest.approx(0.6)
    assert sums["abs_max"] == pytest.approx(0.5) and sums["out_of_clip"] == 1  # exp(0.5) > 1.28; exp(-0.1) inside
    m = mismatch_metrics(sums)
    assert m["mismatch_abs_mean"] == pytest.approx(0.2) and m["mismatch_clip_frac"] == pytest.approx(1 / 3)
    assert mismatch_metrics({})["mismatch_abs_mean"] == 0.0


def test_old_logprobs_flag_is_validated(run, tmp_path):
    with pytest.raises(InputError, match=r"--old-logprobs 'bogus': expected one of stored, recompute"):
        RLConfig(old_logprobs="bogus").check()
    root, policy, _ = run
    r = CliRunner().invoke(main, ["rl-step", "--policy", str(policy), "--samples", str(root / "gen"), "--rewards",
                                  str(root / "rewards"), "--out", str(tmp_path / "o"), "--old-logprobs", "bogus"])
    assert r.exit_code == 2 and "--old-logprobs" in r.output and not (tmp_path / "o").exists()


def test_length_buckets_give_the_same_update_with_less_padding(run, tmp_path):
    root, policy, rows = run
    run_step(root, policy, tmp_path / "plain", beta=0.01, minibatch=6, micro_batch=2)
    run_step(root, policy, tmp_path / "buckets", beta=0.01, minibatch=6, micro_batch=2, length_buckets=True)
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "buckets")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)  # float summation order only
    ma, mb = step_metrics(tmp_path / "plain"), step_metrics(tmp_path / "buckets")
    for k in ("loss", "kl", "pg_loss", "grad_norm", "tokens"):
        assert mb[k] == pytest.approx(ma[k], abs=1e-6), k
    # the order: by sequence length, stable among equals
    order = by_length(rows, range(len(rows)))
    lens = [len(rows[i]["input_ids"]) for i in order]
    assert lens == sorted(lens)
    width = sum(max(len(rows[i]["input_ids"]) for i in order[s:s + 2]) for s in range(0, len(order), 2))
    unsorted = sum(max(len(rows[i]["input_ids"]) for i in range(s, min(s + 2, len(rows))))
                   for s in range(0, len(rows), 2))
    assert width <= unsorted


def test_timers_are_in_the_metrics_and_the_summary(run, tmp_path):
    root, policy, _ = run
    s = run_step(root, policy, tmp_path / "t", beta=0.01, old_logprobs="recompute")
    m = step_metrics(tmp_path / "t")
    for k in TIMERS:
        assert k in m and m[k] >= 0.0 and s[k] == m[k], k
    assert m["save_s"] > 0.0 and m["wall_s"] >= m["update_s"] + m["save_s"]
    assert json.loads((tmp_path / "t" / "rl_step.json").read_text())["metrics"]["save_s"] == m["save_s"]
    assert sorted(p.name for p in (tmp_path / "t").iterdir() if p.name.startswith(".")) == []


def test_adamw_is_fused_only_with_every_weight_on_cuda_and_keeps_its_kernel_over_a_parent_state():
    model = torch.nn.Linear(3, 2)

    class OneProcess:
        distributed_type = "NO"

    assert use_fused_adamw(model, RLConfig(), OneProcess()) is False  # CPU weights: the plain kernel
    assert use_fused_adamw(model, RLConfig(fused_adamw=False), OneProcess()) is False
    opt = make_optimizer(model, RLConfig(), False)
    assert not opt.defaults.get("fused")
    # a parent written by a fused run (its step counters on the weights' device) loads into a plain run
    parent = make_optimizer(torch.nn.Linear(3, 2), RLConfig(), True)  # torch also has a fused CPU kernel
    parent.param_groups[0]["params"][0].grad = torch.ones(2, 3)
    parent.param_groups[0]["params"][1].grad = torch.ones(2)
    parent.step()
    opt.load_state_dict(parent.state_dict())
    assert opt.param_groups[0]["fused"] is True  # what load_state_dict does on its own
    set_fused(opt, False)
    assert opt.param_groups[0]["fused"] is None
    assert all(opt.state[p]["step"].device.type == "cpu" for p in model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert float(opt.state[model.weight]["step"]) == 2.0
    before = opt.state_dict()
    set_fused(opt, False)  # already plain: untouched
    assert opt.state_dict()["param_groups"] == before["param_groups"]


def test_gradient_checkpointing_gives_the_same_update(run, tmp_path):
    root, policy, _ = run
    run_step(root, policy, tmp_path / "plain", beta=0.01)
    run_step(root, policy, tmp_path / "ckpt", beta=0.01, gradient_checkpointing=True)
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["stored", "recompute"])
def test_two_process_ddp_with_length_buckets_matches_one_process_and_its_mismatch(run, tmp_path, mode):
    """DDP on CPU (gloo): with length-ordered micro-batches and either pi_old, 2 processes give one
    process's update and mismatch metrics (stored: each process measures its rows of the first
    minibatch and the sums / max are combined; recompute: every process scores every row)."""
    import os
    import subprocess

    root, policy, _ = run
    args = ["--policy", str(policy), "--samples", str(root / "gen"), "--rewards", str(root / "rewards"),
            "--lr", "1e-3", "--micro-batch", "2", "--minibatch", "5", "--device", "cpu", "--quiet",
            "--old-logprobs", mode, "--length-buckets"]
    r = CliRunner().invoke(main, ["rl-step", *args, "--out", str(tmp_path / "one"),
                                  "--run-metrics", str(tmp_path / "m1.parquet")])
    assert r.exit_code == 0, r.output
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rl3d.cli.main", "rl-step", *args, "--out", str(tmp_path / "two"),
           "--run-metrics", str(tmp_path / "m2.parquet")]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    m1, m2 = step_metrics(tmp_path / "one"), step_metrics(tmp_path / "two")
    assert m1["updates"] == m2["updates"] == 3
    for k in ("loss", "pg_loss", "kl", "grad_norm", "ratio_mean"):
        assert m2[k] == pytest.approx(m1[k], rel=1e-4, abs=1e-6), k
    assert m2["mismatch_tokens"] == m1["mismatch_tokens"] > 0
    assert m2["mismatch_abs_max"] < 1e-5 and m2["mismatch_abs_mean"] < 1e-6 and m2["mismatch_clip_frac"] == 0.0
    w0, w1, w2 = (load_file(p / "model.safetensors") for p in (Path(policy), tmp_path / "one", tmp_path / "two"))
    moved = sum(float(((w1[k] - w0[k]) ** 2).sum()) for k in w1) ** 0.5
    apart = sum(float(((w1[k] - w2[k]) ** 2).sum()) for k in w1) ** 0.5
    assert moved > 0 and apart < 1e-2 * moved


# ---- --micro-batch auto -------------------------------------------------------------------------

def test_micro_batch_auto_is_8_on_a_cpu_and_trains_the_same(run, tmp_path):
    root, policy, _ = run
    run_step(root, policy, tmp_path / "eight", micro_batch=8)
    run_step(root, policy, tmp_path / "auto", micro_batch="auto")
    a, b = _weights(tmp_path / "eight"), _weights(tmp_path / "auto")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_micro_batch_auto_on_a_gpu_fills_half_the_memory_left(monkeypatch):
    """The size from the card's total memory, the model's shape and the longest sequence: a power
    of two, at most 256, at least 1; more with activation checkpointing."""
    from types import SimpleNamespace

    from rl3d.stages.rl import micro_batch as mb

    model = torch.nn.Linear(1000, 1000)  # 1M weights: 16 MB with gradient and AdamW state
    model.config = SimpleNamespace(hidden_size=256, num_hidden_layers=6, intermediate_size=704, vocab_size=21489)
    per_token = mb.activation_bytes_per_token(model.config, False)
    assert per_token == 6 * (28 * 256 + 8 * 704) + 12 * 21489
    assert mb.activation_bytes_per_token(model.config, True) < per_token

    def card(gib):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=gib << 30))

    card(80)
    room = 0.5 * ((80 << 30) - mb.state_bytes(model))
    want = int(room // (800 * per_token))
    got = mb.auto_rows(model, torch.device("cuda"), 800, False)
    assert got == 1 << (want.bit_length() - 1) and got <= want < 2 * got
    assert mb.auto_rows(model, torch.device("cuda"), 10, False) == mb.MAX_ROWS
    assert mb.auto_rows(model, torch.device("cuda"), 800, True) >= got
    assert mb.auto_rows(model, torch.device("cuda"), 800, False, reference_bytes=60 << 30) < got
    card(1)
    assert mb.auto_rows(model, torch.device("cuda"), 100_000, False) == 1
    assert mb.auto_rows(model, torch.device("cpu"), 800, False) == mb.CPU_ROWS


def test_gradient_checkpointing_auto_recomputes_only_where_the_micro_batch_would_not_fit(monkeypatch):
    from types import SimpleNamespace

    from rl3d.stages.rl import micro_batch as mb

    model = torch.nn.Linear(1000, 1000)
    model.config = SimpleNamespace(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, vocab_size=159859)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 << 30))
    fit = mb.rows_that_fit(model, torch.device("cuda"), 1130, False)
    assert 1 <= fit < 8  # the 7B shape's activations: a few ~1,130-token sequences fit without recomputing
    assert mb.rows_that_fit(model, torch.device("cuda"), 1130, True) > fit
    assert mb.needs_checkpointing(model, torch.device("cuda"), 1130, fit + 1)
    assert not mb.needs_checkpointing(model, torch.device("cuda"), 1130, fit)
    assert mb.needs_checkpointing(model, torch.device("cuda"), 1130, "auto") == (fit < mb.MIN_ROWS)
    assert not mb.needs_checkpointing(model, torch.device("cuda"), 100, "auto")
    assert not mb.needs_checkpointing(model, torch.device("cpu"), 100_000, 256)


def test_gradient_checkpointing_auto_switches_per_update_and_trains_the_same(run, tmp_path, monkeypatch):
    from rl3d.stages.rl import learner

    root, policy, _ = run
    switched = []
    real = learner.set_checkpointing
    monkeypatch.setattr(learner, "set_checkpointing", lambda model, on: (switched.append(on), real(model, on)))
    run_step(root, policy, tmp_path / "cpu", beta=0.01, gradient_checkpointing="auto")
    assert switched == []  # a CPU never recomputes
    run_step(root, policy, tmp_path / "plain", beta=0.01)
    monkeypatch.setattr(learner, "needs_checkpointing", lambda *a: True)
    run_step(root, policy, tmp_path / "auto", beta=0.01, gradient_checkpointing="auto")
    assert switched == [True]
    a, b, c = _weights(tmp_path / "plain"), _weights(tmp_path / "auto"), _weights(tmp_path / "cpu")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
        assert torch.equal(c[k], a[k])


@pytest.mark.parametrize("args,value", [([], False), (["--gradient-checkpointing"], True),
                                        (["--gradient-checkpointing", "auto"], "auto"),
                                        (["--gradient-checkpointing", "off"], False),
                                        (["--gradient-checkpointing", "on", "--length-buckets"], True)])
def test_gradient_checkpointing_option_is_on_alone_or_takes_on_off_auto(args, value):
    import click

    from rl3d.cli.update_options import update_options

    @click.command()
    @update_options
    def probe(**kw):
        print(repr(kw["gradient_checkpointing"]))

    r = CliRunner().invoke(probe, args)
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr(value)
    assert RLConfig(gradient_checkpointing=value).check().gradient_checkpointing == value
    bad = CliRunner().invoke(probe, ["--gradient-checkpointing", "sometimes"])
    assert bad.exit_code == 2 and "expected on, off or auto" in bad.output
    with pytest.raises(InputError, match="--gradient-checkpointing sometimes: expected on, off or auto"):
        RLConfig(gradient_checkpointing="sometimes").check()


def test_micro_batch_option_takes_a_number_or_auto():
    assert RLConfig(micro_batch="auto").check().micro_batch == "auto"
    with pytest.raises(InputError, match="--micro-batch 0: must be >= 1 or auto"):
        RLConfig(micro_batch=0).check()
    with pytest.raises(InputError, match="--micro-batch many: must be >= 1 or auto"):
        RLConfig(micro_batch="many").check()
    r = CliRunner().invoke(main, ["rl-step", "--policy", "p", "--samples", "s", "--rewards", "r", "--out", "o",
                                  "--micro-batch", "many"])
    assert r.exit_code == 2 and "expected a number of sequences or auto" in r.output


MIN_SCRIPT = """
import os, sys
from types import SimpleNamespace
import torch.distributed as dist
from rl3d.stages.rl.processes import min_over_processes
dist.init_process_group("gloo")
rank = dist.get_rank()
got = min_over_processes(SimpleNamespace(num_processes=2, device="cpu"), [64, 16][rank])
open(os.path.join(sys.argv[1], f"rank{rank}"), "w").write(str(got))
dist.destroy_process_group()
"""


def test_processes_agree_on_the_smallest_auto_micro_batch(tmp_path):
    """Each process sizes "auto" for its own card; all take the smallest, so their micro-batches pair up."""
    import os
    import subprocess
    from types import SimpleNamespace

    from rl3d.stages.rl.processes import min_over_processes

    assert min_over_processes(SimpleNamespace(num_processes=1), 7) == 7
    script = tmp_path / "min.py"
    script.write_text(MIN_SCRIPT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(tmp_path)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["16", "16"]
