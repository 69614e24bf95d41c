"""`rl3d rl-step`: one Hi-GRPO (or GRPO) policy update from a samples table and a rewards table.

A DirJob of the stage contract (RLStepJob): the driver skips a complete checkpoint made with the
same settings, and renames the checkpoint into place; build() reads top to bottom: check inputs ->
load the batch -> load the learner -> update -> checkpoint.
The library it calls is stages/rl/: learner.py (the policy in training and one update, shared with
`rl3d train`), advantages.py, loss.py (the loss, docs/rl.md), update.py (the scoring passes and the
minibatch / micro-batch loop), processes.py (multi-process bookkeeping).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rl3d.formats import shards as shards_io
from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.stages.contract import DirJob, Progress, StageOptions, read_json_record
from rl3d.stages.policy.checkpoint import carried_meta, policy_id, read_policy_meta, rng_state, save_policy, sft_step_of
from rl3d.stages.rl.rl_config import RLConfig, settings_compared
from rl3d.stages.rl.inputs import check_step_inputs
from rl3d.stages.rl.learner import (TIMERS, Learner, make_optimizer, read_batch, set_fused,  # noqa: F401
                                    summary_fields, update_tables, use_fused_adamw)
from rl3d.stages.scoring.run_metrics import append_run_metrics, write_tensorboard  # noqa: F401 (rl-step's API)

__all__ = ["RLConfig", "RLStepJob", "StepOptions", "run_rl_step", "append_run_metrics", "DONE_FILE", "TIMERS", "make_optimizer", "set_fused",
           "use_fused_adamw"]

DONE_FILE = "rl_step.json"


@dataclass
class StepOptions:
    """rl-step's options besides the update's (RLConfig): where the reference, metrics and models come from."""
    ref_dir: str | Path | None = None
    run_metrics: str | None = None
    device: str | None = None
    dtype: str | None = None
    lora_rank: int = 0
    allow_off_policy: bool = False
    allow_unverified: bool = False
    tensorboard: str | None = None
    startup_s: float = 0.0  # the caller's seconds before the step (the CLI's imports), kept with the phase timers


class RLStepJob(DirJob):
    """One update of the policy in `policy_dir` from a samples and a rewards table, into a complete
    checkpoint dir (rl_step.json last, recording the RL settings: another setting is refused, never
    a silent skip). Every process of a multi-process launch trains; the main one writes."""

    stage, marker, what = "rl-step", DONE_FILE, "a complete rl-step checkpoint"
    how_only = ("micro_batch", "gradient_checkpointing", "fused_adamw", "length_buckets")  # how, not what
    takes_empty_out = False  # a step dir made by hand is no checkpoint of this step

    def __init__(self, policy_dir, samples_path, rewards_path, cfg: RLConfig, options: StepOptions = StepOptions()):
        self.policy_dir, self.samples_path, self.rewards_path = policy_dir, samples_path, rewards_path
        self.cfg, self.options = cfg, options

    def config(self) -> dict:
        return settings_compared(asdict(self.cfg))

    def recorded_config(self, out: Path) -> dict | None:
        recorded = read_json_record(out / self.marker, "rl-step record").get("config")
        # every rl-step writes it; a hand-made record without it is taken as is
        rl = recorded.get("rl") if isinstance(recorded, dict) else None
        return settings_compared(rl) if isinstance(rl, dict) else None

    def temp_dir(self, out: Path) -> Path:
        return out.with_name(f".{out.name}.rl-tmp")  # the name `rl3d status` counts as a started step

    def writes_output(self) -> bool:
        # the main process of a launch (accelerate's is_main_process: global rank 0) writes the checkpoint
        return int(os.environ.get("RANK", "0")) == 0

    def run(self, opts: StageOptions) -> dict:
        shards_io.check_out_apart(opts.out, {"--policy": self.policy_dir, "--samples": self.samples_path,
                                             "--rewards": self.rewards_path, "--ref": self.options.ref_dir})
        return super().run(opts)

    def skip(self, out: Path, progress: Progress) -> dict:
        run_metrics = self.options.run_metrics
        if run_metrics and (out / "metrics").is_dir():  # a kill between the rename and the append: redo it
            append_run_metrics(Path(run_metrics), tables.read_table(out / "metrics", "metrics"))
        return {}

    def build(self, into: Path | None, opts: StageOptions, progress: Progress) -> dict:
        """Check inputs -> load the batch -> load the learner -> update -> the checkpoint into `into`
        (None: a process that does not write)."""
        cfg, o = self.cfg, self.options
        check_step_inputs(self.policy_dir, self.samples_path, self.rewards_path, cfg)  # one line naming file and row
        t0 = time.time()
        torch.manual_seed(cfg.seed)

        # 1. data: samples joined with rewards
        check_batch(self.samples_path, self.rewards_path, self.policy_dir, o.allow_off_policy, progress,
                    o.allow_unverified)
        samples, rewards = read_batch(self.samples_path, self.rewards_path)
        load_s = time.time() - t0

        # 2. models: the policy being trained, its optimizer state and (at the update) the frozen reference
        t_models = time.time()
        self.learner = learner = Learner(self.policy_dir, cfg, ref_dir=o.ref_dir, device=o.device, dtype=o.dtype,
                                         lora_rank=o.lora_rank, progress=progress)
        timings = {"startup_s": o.startup_s, "load_s": load_s, "model_load_s": time.time() - t_models}

        # 3. advantages, reference log-probs, epochs x minibatches of optimizer steps, metrics
        result = learner.update(samples, rewards, timings, o.run_metrics)
        self.metrics = metrics = result.metrics

        # 4. checkpoint: full weights and optimizer state, gathered by every process (under FSDP each holds a shard)
        self.save_started = t3 = time.time()
        progress.log(f"rl-step: writing the checkpoint {opts.out}")
        weights, opt_state = learner.full_state()
        if into is not None:
            self.metrics_table = _save_checkpoint(
                into, learner.model_to_save(), weights, opt_state, learner.policy, cfg, learner.meta, learner.initial,
                result.adv_rows, metrics, self.samples_path, self.rewards_path, started=t3)
        return {"step": metrics["step"]}

    def after(self, out: Path, fields: dict) -> dict:
        """The step's row appended to the run metrics and TensorBoard once the checkpoint is in place."""
        metrics = self.metrics
        if self.learner.acc.is_main_process:
            if self.options.run_metrics:
                append_run_metrics(Path(self.options.run_metrics), self.metrics_table)
            if self.options.tensorboard:
                write_tensorboard(self.options.tensorboard, metrics["step"], metrics)
        self.learner.acc.wait_for_everyone()
        if not self.learner.acc.is_main_process:
            metrics["save_s"] = round(time.time() - self.save_started, 3)
        return {**fields, **summary_fields(metrics)}


def run_rl_step(policy_dir, samples_path, rewards_path, out, cfg: RLConfig, ref_dir=None,
                run_metrics: str | None = None, device=None, dtype=None, overwrite=False,
                lora_rank: int = 0, progress=None, allow_off_policy: bool = False,
                tensorboard: str | None = None, startup_s: float = 0.0, allow_unverified: bool = False) -> dict:
    """One step (docs/rl.md): RLStepJob, driven once. `progress`: its quiet setting is kept."""
    options = StepOptions(ref_dir, run_metrics, device, dtype, lora_rank, allow_off_policy, allow_unverified,
                          tensorboard, startup_s)
    return RLStepJob(policy_dir, samples_path, rewards_path, cfg, options).run(
        StageOptions(out=Path(out), overwrite=overwrite, quiet=bool(progress and progress.quiet), seed=cfg.seed))


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


def _save_checkpoint(into: Path, model, weights, opt_state, policy, cfg, meta, initial, adv_rows, metrics,
                     samples_path, rewards_path, started: float):
    """Everything into the job's temp dir (the contract renames it onto --out: a killed rl-step leaves
    no checkpoint, and rerunning it reproduces the same parameters); returns the metrics table. The
    optimizer state (twice the weights' size) is written by a background thread while the weights are,
    and joined before the metrics, so save_s (seconds since `started`: gathering and writing the
    state) is in them."""
    extra = {**carried_meta(meta), "initial_policy": initial, "parent": str(Path(policy.path).resolve()),
             "rl_config": asdict(cfg)}
    extra["rl_step"] = metrics["step"]
    extra["optimizer_updates"] = metrics["optimizer_updates"]
    extra["sft_step"] = sft_step_of(meta)
    with ThreadPoolExecutor(max_workers=1) as writer:
        # none for LoRA: the adapter is merged on save
        opt_written = writer.submit(torch.save, opt_state, into / "optimizer.pt") if opt_state is not None else None
        # save_policy writes into a temp dir of its own and renames it onto `weights_dir`
        weights_dir = into / ".weights"
        save_policy(weights_dir, model, policy.tokenizer, policy.codec, step=metrics["step"],
                    base=meta.get("base"), codec_ref=None, extra=extra, state_dict=weights)
        if opt_written is not None:
            opt_written.result()  # re-raises a failed write
    for f in weights_dir.iterdir():
        f.rename(into / f.name)
    weights_dir.rmdir()
    torch.save(rng_state(), into / "rng_state.pt")
    metrics["save_s"] = round(time.time() - started, 3)
    metrics["wall_s"] = round(metrics.get("wall_s", 0.0) + metrics["save_s"], 3)
    config = {"rl": asdict(cfg), "samples": str(samples_path), "rewards": str(rewards_path), "policy": str(policy.path)}
    adv, mt = update_tables(adv_rows, metrics, config, policy.policy_id)
    shards_io.write_part(adv, into / "advantages", shards_io.Shard(0, 1))
    shards_io.write_part(mt, into / "metrics", shards_io.Shard(0, 1))
    shards_io.atomic_write_json(into / DONE_FILE, {"config": config, "metrics": metrics})
    return mt


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
