"""`rl3d rl-step`: one Hi-GRPO (or GRPO) policy update from a samples table and a rewards table.

Read top to bottom: check inputs -> load the batch -> load the learner -> update -> checkpoint.
The library it calls is stages/rl/: learner.py (the policy in training and one update, shared with
`rl3d train`), advantages.py, loss.py (the loss, docs/rl.md), update.py (the scoring passes and the
minibatch / micro-batch loop), processes.py (multi-process bookkeeping).
"""
from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from rl3d.formats import shards as shards_io
from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.stages.contract import Progress
from rl3d.stages.policy.checkpoint import carried_meta, policy_id, read_policy_meta, rng_state, save_policy, sft_step_of
from rl3d.stages.rl.config import RLConfig
from rl3d.stages.rl.inputs import check_step_inputs
from rl3d.stages.rl.learner import (TIMERS, Learner, make_optimizer, read_batch, set_fused,  # noqa: F401
                                    summary_fields, update_tables, use_fused_adamw)
from rl3d.stages.scoring.run_metrics import append_run_metrics, write_tensorboard  # noqa: F401 (rl-step's API)

__all__ = ["RLConfig", "run_rl_step", "append_run_metrics", "DONE_FILE", "TIMERS", "make_optimizer", "set_fused",
           "use_fused_adamw"]

DONE_FILE = "rl_step.json"


def run_rl_step(policy_dir, samples_path, rewards_path, out, cfg: RLConfig, ref_dir=None,
                run_metrics: str | None = None, device=None, dtype=None, overwrite=False,
                lora_rank: int = 0, progress=None, allow_off_policy: bool = False,
                tensorboard: str | None = None, startup_s: float = 0.0, allow_unverified: bool = False) -> dict:
    """One step (docs/rl.md). `startup_s`: the caller's seconds before this call (the CLI's imports),
    recorded with the phase timers."""
    progress = progress or Progress()
    out = Path(out)
    shards_io.check_out_apart(out, {"--policy": policy_dir, "--samples": samples_path, "--rewards": rewards_path,
                                    "--ref": ref_dir})
    if (out / DONE_FILE).exists() and not overwrite:
        _check_same_config(out, cfg)  # a changed setting is an error, never a silent skip
        progress.log(f"rl-step: {out} is already a complete checkpoint, skipping (use --overwrite to redo)")
        if run_metrics and (out / "metrics").is_dir():  # a kill between the rename and the append: redo it
            append_run_metrics(Path(run_metrics), tables.read_table(out / "metrics", "metrics"))
        return {"stage": "rl-step", "out": str(out), "skipped": True}
    if out.exists() and not overwrite:  # before any training, not after it
        raise InputError(f"{out}: exists and is not a complete rl-step checkpoint; use --overwrite")
    check_step_inputs(policy_dir, samples_path, rewards_path, cfg)  # input guard: one line naming file and row
    t0 = time.time()
    torch.manual_seed(cfg.seed)

    # 1. data: samples joined with rewards
    check_batch(samples_path, rewards_path, policy_dir, allow_off_policy, progress, allow_unverified)
    samples, rewards = read_batch(samples_path, rewards_path)
    load_s = time.time() - t0

    # 2. models: the policy being trained, its optimizer state and (at the update) the frozen reference
    t_models = time.time()
    learner = Learner(policy_dir, cfg, ref_dir=ref_dir, device=device, dtype=dtype, lora_rank=lora_rank,
                      progress=progress)
    timings = {"startup_s": startup_s, "load_s": load_s, "model_load_s": time.time() - t_models}

    # 3. advantages, reference log-probs, epochs x minibatches of optimizer steps, metrics
    result = learner.update(samples, rewards, timings, run_metrics)
    metrics = result.metrics

    # 4. checkpoint: full weights and optimizer state, gathered by every process (under FSDP each holds a shard)
    t3 = time.time()
    progress.log(f"rl-step: writing the checkpoint {out}")
    weights, opt_state = learner.full_state()
    if learner.acc.is_main_process:
        try:
            _save_checkpoint(out, learner.model_to_save(), weights, opt_state, learner.policy, cfg, learner.meta,
                             learner.initial, result.adv_rows, metrics, samples_path, rewards_path, run_metrics,
                             overwrite, started=t3)
        except BaseException:  # a failed save leaves no half checkpoint behind (a kill leaves it for the rerun)
            shutil.rmtree(out.with_name(f".{out.name}.rl-tmp"), ignore_errors=True)
            raise
        if tensorboard:
            write_tensorboard(tensorboard, metrics["step"], metrics)
    learner.acc.wait_for_everyone()
    if not learner.acc.is_main_process:
        metrics["save_s"] = round(time.time() - t3, 3)
    return {"stage": "rl-step", "out": str(out), "skipped": False, "step": metrics["step"],
            "seconds": round(time.time() - t0, 2), **summary_fields(metrics)}


def check_batch(samples_path, rewards_path, policy_dir, allow_off_policy: bool, progress,
                allow_unverified: bool = False) -> None:
    """Refuse rewards of other samples, and samples drawn by another policy than the one being
    updated (GRPO's ratio assumes the samples' log-probs are this policy's) unless allowed."""
    samples = tables.provenance(samples_path)
    warning = tables.require_made_for(tables.provenance(rewards_path), "samples", samples, allow_unverified)
    if warning:
        progress.log(f"WARNING: {warning}")
    if allow_off_policy:
        return
    path = Path(policy_dir).resolve()
    current = policy_id(path, read_policy_meta(path))
    if samples.kind is None:  # the metadata is gone: every row still says which policy drew it
        _check_row_policies(samples_path, current)
        return
    if not tables.same_policy(samples.policy, current):
        raise InputError(f"{samples_path}: sampled by policy {samples.policy}, not by --policy {current}; "
                         f"pass --allow-off-policy to update from another policy's samples")


def _save_checkpoint(out: Path, model, weights, opt_state, policy, cfg, meta, initial, adv_rows, metrics,
                     samples_path, rewards_path, run_metrics, overwrite, started: float):
    """Everything lands in a temp dir renamed at the end: a killed rl-step leaves no checkpoint,
    and rerunning it reproduces the same parameters. The optimizer state (twice the weights' size)
    is written by a background thread while the weights are, and joined before the metrics, so
    save_s (seconds since `started`: gathering and writing the state) is in them."""
    tmp = out.with_name(f".{out.name}.rl-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    extra = {**carried_meta(meta), "initial_policy": initial, "parent": str(Path(policy.path).resolve()),
             "rl_config": asdict(cfg)}
    extra["rl_step"] = metrics["step"]
    extra["optimizer_updates"] = metrics["optimizer_updates"]
    extra["sft_step"] = sft_step_of(meta)
    tmp.mkdir(parents=True)
    with ThreadPoolExecutor(max_workers=1) as writer:
        # none for LoRA: the adapter is merged on save
        opt_written = writer.submit(torch.save, opt_state, tmp / "optimizer.pt") if opt_state is not None else None
        # save_policy writes into a temp dir of its own and renames it onto `weights_dir`
        weights_dir = tmp / ".weights"
        save_policy(weights_dir, model, policy.tokenizer, policy.codec, step=metrics["step"],
                    base=meta.get("base"), codec_ref=None, extra=extra, state_dict=weights)
        if opt_written is not None:
            opt_written.result()  # re-raises a failed write
    for f in weights_dir.iterdir():
        f.rename(tmp / f.name)
    weights_dir.rmdir()
    torch.save(rng_state(), tmp / "rng_state.pt")
    metrics["save_s"] = round(time.time() - started, 3)
    metrics["wall_s"] = round(metrics.get("wall_s", 0.0) + metrics["save_s"], 3)
    config = {"rl": asdict(cfg), "samples": str(samples_path), "rewards": str(rewards_path), "policy": str(policy.path)}
    adv, mt = update_tables(adv_rows, metrics, config, policy.policy_id)
    shards_io.write_part(adv, tmp / "advantages", shards_io.Shard(0, 1))
    shards_io.write_part(mt, tmp / "metrics", shards_io.Shard(0, 1))
    shards_io.atomic_write_json(tmp / DONE_FILE, {"config": config, "metrics": metrics})
    if out.exists():
        if not overwrite:
            raise InputError(f"{out}: exists and is not a complete rl-step checkpoint; use --overwrite")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    if run_metrics:
        append_run_metrics(Path(run_metrics), mt)


# settings that change how a step is computed, not its result
_HOW_ONLY = ("micro_batch", "gradient_checkpointing", "fused_adamw", "length_buckets")


def _check_same_config(out: Path, cfg: RLConfig) -> None:
    """Refuse a complete checkpoint made with other RL settings than `cfg` (rl_step.json records them)."""
    try:
        record = json.loads((out / DONE_FILE).read_text())
    except (OSError, ValueError):
        raise InputError(f"{out / DONE_FILE}: not a readable rl-step record; use --overwrite") from None
    recorded = (record.get("config") or {}).get("rl") if isinstance(record, dict) else None
    if isinstance(recorded, dict):  # every rl-step writes it; a hand-made record without it is taken as is
        shards_io.check_same_config(out / DONE_FILE, recorded, asdict(cfg), _HOW_ONLY)


def _check_row_policies(samples_path, current: str) -> None:
    """The off-policy check on rows (each samples row records its policy_id) for a table whose schema
    metadata another tool dropped."""
    t = tables.read_table(samples_path, "samples")
    if "policy_id" not in t.column_names:
        return
    for n, pid in enumerate(t.column("policy_id").to_pylist(), 1):
        if not tables.same_policy(pid, current):
            raise InputError(f"{samples_path}: row {n}: sampled by policy {pid}, not by --policy {current}; "
                             f"pass --allow-off-policy to update from another policy's samples")
