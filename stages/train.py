"""`rl3d train`: N Hi-GRPO (or flat GRPO) iterations in one resident process per node.

The loop drives the same Jobs the commands drive (gen, render, reward) and the same Learner that
`rl3d rl-step` uses, and writes the same per-stage directories with the same schemas and
provenance (RUN/step-NNNNNN/{prompts,gen,renders,rewards,update}); what it adds is that the policy,
the reference, the optimizer state, the tokenizer, the codec, the reward models and the worker
pools stay loaded between steps. A step, top to bottom:

    prompts -> gen (sampling copy of the policy) -> render -> reward -> update (the learner)
    -> copy the new weights into the sampling copy -> checkpoint every K steps -> held-out eval

Resume: the newest complete checkpoint is loaded; steps after it whose update is recorded are
replayed from their recorded samples and rewards (the update only: nothing is sampled, scored or
written again); every later stage whose output is complete is skipped. With --overlap 1 the
sampling of step t+1 runs while step t is rendered, scored and trained on, and the update of
step t+1 corrects its one-version-old samples with truncated importance sampling.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rl3d.formats import shards as shards_io
from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.formats.shards import Shard, config_hash
from rl3d.stages.contract import Progress, StageOptions, duration, timed, usable_cores
from rl3d.stages.gen import GenJob, GenOptions
from rl3d.stages.loop import swap
from rl3d.stages.loop.checkpoints import (RESUMABLE, checkpoint_dir, latest_checkpoint, load_state,
                                          record_settings, resident_policy_id, save_checkpoint, step_dir)
from rl3d.stages.loop.feed import PromptFeed
from rl3d.stages.loop.profile import profiled
from rl3d.stages.policy.checkpoint import Policy, default_policy_dir, load_policy, policy_id, read_policy_meta
from rl3d.stages.policy.device import resolve_device_dtype
from rl3d.stages.raycast import held_views
from rl3d.stages.render import RenderJob, worker_pool
from rl3d.stages.reward import RewardJob, host_pool
from rl3d.stages.rewards.reward_config import backend_class, load_config
from rl3d.stages.rl.rl_config import RLConfig, settings_compared
from rl3d.stages.rl.inputs import check_step_inputs
from rl3d.stages.rl.learner import Learner, read_batch, summary_fields, update_tables
from rl3d.stages.scoring.run_metrics import append_run_metrics, write_tensorboard

UPDATE_DONE = "update.json"
ALGO_OF_MODE = {"hi-grpo": "hi-grpo", "flat": "grpo"}  # gen mode -> the update's algorithm
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class TrainOptions:
    """Every setting of a run; the ones that change what a step computes are recorded in
    RUN/train.json and must match on resume (checkpoints.RESUMABLE lists the others)."""
    prompts: str
    out: Path
    policy: str | None = None           # None: the shipped default policy
    steps: int = 10
    prompts_per_step: int = 64
    mode: str = "hi-grpo"               # hi-grpo | flat
    group_size: int = 8
    views: int = 6
    resolution: int = 512
    supersample: int = 2
    gen_batch_size: int | None = None   # sequences sampled together (None: gen's default; samples unchanged)
    render_backend: str = "auto"
    meshes: bool = True                 # False: no GLBs and no render stage (rewards that read no views)
    sheet: bool = True                  # False: render writes no contact sheets (as rl3d render --no-sheet)
    rewards: str | None = None          # preset name or TOML; None: "default" (hi-grpo) or "flat"
    seed: int = 0
    sampling_preset: str | None = None
    sampling_overrides: dict = field(default_factory=dict)
    rl: RLConfig = field(default_factory=RLConfig)
    lora_rank: int = 0
    ref: str | None = None
    save_every: int = 10
    keep_checkpoints: int = 2
    overlap: int = 0
    stages: dict = field(default_factory=dict)  # stage -> a user's command (loop.swap)
    eval_every: int = 0
    eval_bench: str | None = None
    eval_limit: int | None = None
    tensorboard: str | None = None
    profile_step: int = 0               # > 0: profile that step into RUN/profile (loop.profile)
    time_limit: float = 0.0             # > 0: stop (checkpoint, exit 0) at the first stage boundary past it
    device: str | None = None
    dtype: str | None = None
    allow_changes: bool = False
    overwrite: bool = False
    quiet: bool = False

    def settings(self) -> dict:
        """The JSON record of train.json: every option, paths resolved."""
        d = asdict(self)
        d.pop("allow_changes")
        d.pop("overwrite")
        for flag in ("meshes", "sheet"):  # recorded only when off: runs made before the option resume unchanged
            if d[flag]:
                d.pop(flag)
        d["rl"] = settings_compared(d["rl"])  # likewise for update settings added since
        d["out"] = str(Path(self.out).resolve())
        d["prompts"] = self.prompts if self.prompts == "synth" else str(Path(self.prompts).resolve())
        d["policy"] = str(Path(self.policy).resolve()) if self.policy else str(default_policy_dir())
        return json.loads(json.dumps(d, default=str))


class StopRequested(Exception):
    """A stop signal arrived: checkpoint and leave."""


class TrainJob:
    """The resident loop as a Job: options at construction (validated before anything is written),
    done(out), run(progress)."""

    stage = "train"

    def __init__(self, opts: TrainOptions):
        self.opts = o = opts
        if o.mode not in ALGO_OF_MODE:
            raise InputError(f"--mode {o.mode!r}: expected one of {', '.join(ALGO_OF_MODE)}")
        for name, low in (("steps", 1), ("group_size", 1), ("save_every", 1), ("keep_checkpoints", 0),
                          ("eval_every", 0), ("profile_step", 0)):
            if getattr(o, name) < low:
                raise InputError(f"--{name.replace('_', '-')} {getattr(o, name)}: must be >= {low}")
        if o.overlap not in (0, 1):
            raise InputError(f"--overlap {o.overlap}: expected 0 or 1")
        if o.eval_every and not o.eval_bench:
            raise InputError("--eval-every needs --eval-bench NAME")
        o.rl = dataclasses.replace(o.rl, algo=ALGO_OF_MODE[o.mode], seed=o.seed)
        if o.overlap and o.rl.old_logprobs != "recompute":
            # stale samples: pi_old must be the current policy's, and TIS corrects pi_old / pi_behaviour
            o.rl = dataclasses.replace(o.rl, old_logprobs="recompute", tis_cap=o.rl.tis_cap or 2.0)
        o.rl.check()
        o.rewards = o.rewards or ("default" if o.mode == "hi-grpo" else "flat")
        reward_config = load_config(o.rewards)  # a bad preset or TOML fails before any work
        if not o.meshes:
            viewed = [t.name for lv in reward_config.levels for t in reward_config.terms(lv)
                      if backend_class(t.backend).needs_views]
            if viewed:
                raise InputError(f"--no-meshes: reward term {viewed[0]!r} of {o.rewards} scores rendered views "
                                 f"(renders need the GLBs); drop the flag or use terms that read the voxel grid")
            if "render" in o.stages:
                raise InputError("--no-meshes with --stage render: a render command needs the GLBs")
        o.stages = swap.parse_swaps(o.stages)
        self.run_dir = Path(o.out)
        self.policy_dir = Path(o.policy).resolve() if o.policy else default_policy_dir()
        self.policy_meta = read_policy_meta(self.policy_dir)
        self.feed = PromptFeed(o.prompts, o.prompts_per_step, o.seed)
        self.render_opts = dict(views=o.views, resolution=o.resolution, supersample=o.supersample,
                                backend=o.render_backend, sheet=o.sheet)
        self.gen_options = GenOptions(mode=o.mode, group_size=o.group_size, sampling=None, batch_size=o.gen_batch_size,
                                      device=o.device,
                                      dtype=o.dtype, sampling_preset=o.sampling_preset,
                                      sampling_overrides=o.sampling_overrides, meshes=o.meshes)
        self.stop: str | None = None
        self.phase_totals: dict[str, list[float]] = {}  # phase -> seconds of each step run
        self.evals: list[tuple[int, subprocess.Popen]] = []

    # ---- the contract ----------------------------------------------------------------------

    def done(self, out: Path | None = None) -> bool:
        """Whether the run holds all its steps (the last one checkpointed)."""
        last = latest_checkpoint(Path(out or self.run_dir))
        return last is not None and last[0] >= self.opts.steps

    def run(self, progress: Progress | None = None) -> dict:
        o = self.opts
        progress = progress or Progress(o.quiet)
        t_start = self.t_start = time.time()
        old_run = self._set_aside() if o.overwrite else None
        settings = o.settings()
        fixed = {k: v for k, v in settings.items() if k not in RESUMABLE}
        self.settings_hash = config_hash(fixed)
        self.base_id = policy_id(self.policy_dir, self.policy_meta)

        record_settings(self.run_dir, settings, o.allow_changes, write=False)  # before any model loads

        # 1. where the run stands: the newest checkpoint, else the initial policy
        last = latest_checkpoint(self.run_dir)
        start_step, start_dir = (last[0], last[1]) if last else (0, self.policy_dir)
        if start_step >= o.steps:
            progress.log(f"train: {self.run_dir} already holds {start_step} steps, skipping")
            return {"stage": "train", "out": str(self.run_dir), "skipped": True, "step": start_step}

        # 2. everything that stays loaded: the learner, its sampling copy, the worker pools
        t0 = time.time()
        # a LoRA run trains one adapter on the initial policy: its checkpoints hold the adapter
        learner = Learner(self.policy_dir if o.lora_rank else start_dir, o.rl, ref_dir=o.ref or str(self.policy_dir),
                          device=o.device, dtype=o.dtype, progress=Progress(quiet=True), lora_rank=o.lora_rank,
                          lora_from=last[1] if (o.lora_rank and last) else None)
        self.learner, acc = learner, learner.acc
        from accelerate.utils import DistributedType
        if o.lora_rank and acc.distributed_type == DistributedType.FSDP:
            raise InputError("--lora-rank under FSDP: not supported by rl3d train (use DDP: a LoRA policy's "
                             "trained weights are small enough to replicate)")
        self.main = acc.is_main_process
        if self.main:
            record_settings(self.run_dir, settings, o.allow_changes)
        acc.wait_for_everyone()
        if last:
            state = load_state(last[1])
            learner.rl_step, learner.optimizer_updates = state["step"], state["optimizer_updates"]
        else:
            learner.rl_step = 0
        self.shard = Shard(acc.process_index, acc.num_processes)
        self.sampler = self._sampling_copy(self._policy_id(learner.rl_step))
        self.render_pool, self.reward_pool = self._pools()
        self.saved_step = start_step
        load_s = time.time() - t0
        progress.log(f"train: {self.run_dir} from step {start_step} ({start_dir}), {o.steps} steps of "
                     f"{self.feed.per_step} prompts x G={o.group_size}, models loaded in {load_s:.1f}s")

        previous = self._install_signal_handlers()
        stats = {"steps_run": 0, "steps_replayed": 0, "step_seconds": []}
        try:
            for step in range(start_step + 1, o.steps + 1):
                t_step = time.time()
                with profiled(self.run_dir, step) if step == o.profile_step and self.main else nullcontext():
                    replayed, line = self._step(step, progress)
                if replayed:
                    stats["steps_replayed"] += 1
                else:
                    stats["steps_run"] += 1
                    stats["step_seconds"].append(time.time() - t_step)
                if self.main and line:
                    eta = (o.steps - step) * (sum(stats["step_seconds"][-3:]) / max(len(stats["step_seconds"][-3:]), 1))
                    progress.log(f"{line} ETA {duration(eta)}")
                self._check_stop()
                if step % o.save_every == 0 or step == o.steps or (o.eval_every and step % o.eval_every == 0):
                    self._checkpoint(step)
                if o.eval_every and step % o.eval_every == 0:
                    self._start_eval(step, progress)
        except StopRequested:
            progress.log(f"train: {self.stop}: checkpointing step {learner.rl_step} and stopping")
            self._join_overlap()
            self._checkpoint(learner.rl_step)
        finally:
            self._join_overlap()
            self._restore_signal_handlers(previous)
            for pool in (self.render_pool, self.reward_pool):
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
        evals = self._wait_evals(progress)
        if old_run is not None and self.stop is None:
            shutil.rmtree(old_run, ignore_errors=True)
        secs = stats.pop("step_seconds")
        return {"stage": "train", "out": str(self.run_dir), "skipped": False, "step": learner.rl_step,
                "steps": o.steps, **stats, "stopped": self.stop, "model_load_s": round(load_s, 3),
                "seconds_per_step": round(sum(secs) / len(secs), 3) if secs else None,
                "steady_seconds_per_step": round(sum(secs[1:]) / len(secs[1:]), 3) if len(secs) > 1 else None,
                "seconds": round(time.time() - t_start, 2), "checkpoint": str(checkpoint_dir(self.run_dir, self.saved_step))
                if self.saved_step else None, "evals": evals, "phase_seconds": self.phase_totals}

    def _set_aside(self) -> Path | None:
        """--overwrite: move the old run folder beside it (removed when the new run finishes), so a
        failed or killed new run never leaves the old one half deleted."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise InputError("rl3d train --overwrite: not under a multi-process launch; remove the run folder instead")
        if not self.run_dir.exists():
            return None
        aside = self.run_dir.with_name(f".{self.run_dir.name}.overwritten-{os.getpid()}")
        os.replace(self.run_dir, aside)
        return aside

    # ---- one step ---------------------------------------------------------------------------

    def _step(self, step: int, progress: Progress) -> tuple[bool, str]:
        """Run (or replay) step `step`; returns (replayed, its progress line)."""
        o = self.opts
        d = step_dir(self.run_dir, step)
        t: dict[str, float] = {}
        record = d / "update"
        if (record / UPDATE_DONE).is_file():  # trained before the last kill, after the last checkpoint
            self._replay(step, record, progress)
            return True, ""

        with timed(t, "prompts"):
            if self.main:
                self.feed.job(step).run(StageOptions(out=d / "prompts", quiet=True))
            self._barrier()
        self._check_stop()
        with timed(t, "gen"):
            if self._next_gen is not None:
                self._join_overlap()  # sampled while the previous step was scored and trained on
            else:
                self._gen(step, self.sampler)
            self._barrier()
        if o.overlap and step < o.steps:
            # step + 1 samples now, from the policy before this step's update (one version old)
            self._sync_sampler()
            self._start_gen(step + 1)
        self._check_stop()
        with timed(t, "render"):
            self._render(step, d)
            self._barrier()
        self._check_stop()
        with timed(t, "reward"):
            self._reward(step, d)
            self._barrier()
        self._check_stop()
        with timed(t, "update"):
            metrics = self._update(step, d, record)
        if not o.overlap:
            with timed(t, "sync"):
                self._sync_sampler()
        self._tensorboard(step, metrics, t)
        for k, v in t.items():
            self.phase_totals.setdefault(k, []).append(round(v, 3))
        rewards = " ".join(f"{lv[0]}={metrics[f'reward_mean_{lv}']:.3f}" for lv in ("coarse", "fine", "single")
                           if f"reward_mean_{lv}" in metrics)
        kl = f" kl {metrics['kl']:.2e}" if "kl" in metrics else ""
        phases = " ".join(f"{k} {v:.1f}s" for k, v in t.items())
        line = (f"train: step {step}/{o.steps} {sum(t.values()):.1f}s ({phases}) reward {rewards}{kl} "
                f"entropy {metrics['entropy']:.3f}")
        return False, line

    def _gen(self, step: int, sampler: Policy) -> None:
        d = step_dir(self.run_dir, step)
        m = shards_io.read_manifest(d / "gen") if (d / "gen").is_dir() else None
        if self.opts.overlap and m is not None and m.get("complete"):
            return  # sampled one version back before a resume; _check_batch checks whose samples they are
        # the GLBs are written by the render workers: on this process's threads they slowed the sampler
        job = GenJob(d / "prompts", self.gen_options, seed=self.opts.seed + step, policy=sampler,
                     mesh_pool=self.render_pool)
        job.run(StageOptions(out=d / "gen", shard=self.shard, seed=self.opts.seed + step, quiet=True))

    def _gen_on_own_stream(self, step: int, sampler: Policy) -> None:
        """Overlapped sampling: on a CUDA stream of its own, so that its kernels run beside the main
        thread's render, reward and update instead of queueing behind them."""
        if sampler.device.type != "cuda":
            return self._gen(step, sampler)
        stream = torch.cuda.Stream(device=sampler.device)
        stream.wait_stream(torch.cuda.current_stream(sampler.device))  # the weights copied in before
        with torch.cuda.stream(stream):
            self._gen(step, sampler)
        stream.synchronize()

    def _render(self, step: int, d: Path) -> None:
        if not self.opts.meshes:  # no GLBs to render; the reward reads no views (checked at start)
            return
        if "render" in self.opts.stages:
            self._swapped("render", step, d)
            return
        held_views.release()  # a step whose reward never ran (killed, swapped) holds nothing further
        # the views stay in memory for this step's CLIP term: decoding the PNGs again was most of its time
        job = RenderJob(d / "gen", **self.render_opts, device=self.opts.device, pool=self.render_pool,
                        hold_views=True)
        job.run(StageOptions(out=d / "renders", shard=self.shard, quiet=True))

    def _reward(self, step: int, d: Path) -> None:
        if "reward" in self.opts.stages:
            self._swapped("reward", step, d)
            return
        # renders of a swapped command carry no provenance: the loop checked their rows (loop.swap)
        job = RewardJob(d / "gen", d / "renders" if self.opts.meshes else None, self.opts.rewards, pool=self.reward_pool,
                        allow_unverified="render" in self.opts.stages)
        try:
            job.run(StageOptions(out=d / "rewards", shard=self.shard, quiet=True))
        finally:
            held_views.release()

    def _swapped(self, stage: str, step: int, d: Path) -> None:
        """A user's command in place of a resident stage (main process; the others wait)."""
        out = d / {"render": "renders", "reward": "rewards"}[stage]
        paths = {"samples": str(d / "gen"), "renders": str(d / "renders"), "prompts": str(d / "prompts"),
                 "out": str(out), "step": str(step), "run": str(self.run_dir)}
        if self.main and not swap.done(out, {k: v for k, v in paths.items() if k != "out"}):
            if out.exists():  # a failed or killed earlier attempt: the command gets a clean folder
                shutil.rmtree(out)
            swap.run_swapped(stage, self.opts.stages[stage], paths, d / "gen", step)

    def _update(self, step: int, d: Path, record: Path) -> dict:
        """One update of the resident learner on the step's samples and rewards, recorded in
        RUN/step-N/update (advantages, metrics, update.json) and RUN/metrics.parquet."""
        o, learner = self.opts, self.learner
        check_step_inputs(self.policy_dir, d / "gen", d / "rewards", o.rl)
        self._check_batch(step, d)
        samples, rewards = read_batch(d / "gen", d / "rewards")
        run_metrics = str(self.run_dir / "metrics.parquet")
        result = learner.update(samples, rewards, {}, run_metrics)
        metrics = result.metrics
        metrics["staleness"] = self._staleness(step, d)
        if self.main:
            config = {"rl": asdict(o.rl), "samples": str(d / "gen"), "rewards": str(d / "rewards"),
                      "policy": self._policy_id(step - 1), "train": self.settings_hash}
            write_update_record(record, result.adv_rows, metrics, config, self._policy_id(step))
            _, mt = update_tables(result.adv_rows, metrics, config, self._policy_id(step))
            append_run_metrics(Path(run_metrics), mt)
        self._barrier()
        return metrics

    def _replay(self, step: int, record: Path, progress: Progress) -> None:
        """Re-apply a recorded update to the weights of the checkpoint before it (nothing is written):
        the same samples, rewards and settings give the same update; the recorded loss is checked."""
        d = step_dir(self.run_dir, step)
        samples, rewards = read_batch(d / "gen", d / "rewards")
        result = self.learner.update(samples, rewards, {}, None)
        recorded = json.loads((record / UPDATE_DONE).read_text())["metrics"]
        got, want = result.metrics.get("loss", 0.0), recorded.get("loss", 0.0)
        if not math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-7):
            progress.log(f"WARNING: replayed step {step}: loss {got:.6g}, recorded {want:.6g} (non-deterministic "
                         f"kernels differ slightly; the run goes on from the replayed weights)")
        else:
            progress.log(f"train: step {step} replayed from its recorded samples and rewards (loss {got:.6g})")
        if self.main:  # a kill between the record and the run metrics' append: the append again (it replaces)
            append_run_metrics(self.run_dir / "metrics.parquet", tables.read_table(record / "metrics", "metrics"))
        self._sync_sampler()

    def _check_batch(self, step: int, d: Path) -> None:
        """The step's samples were drawn by this run's policy of the step before (two before with
        --overlap 1), and its rewards score exactly those samples."""
        samples = tables.provenance(d / "gen")
        rewards = tables.provenance(d / "rewards")
        if rewards.kind is not None:
            tables.require_made_for(rewards, "samples", samples)
        allowed = {self._policy_id(step - 1)}
        if self.opts.overlap:
            allowed.add(self._policy_id(max(step - 2, 0)))
        if not any(tables.same_policy(samples.policy, p) for p in allowed):
            raise InputError(f"{d / 'gen'}: sampled by policy {samples.policy}, not by this run's policy of step "
                             f"{step - 1}: the step folder belongs to another run (use another --out)")

    def _staleness(self, step: int, d: Path) -> int:
        """Policy versions between the samples' policy and the one being updated (0 or 1)."""
        sampled = tables.provenance(d / "gen").policy
        return 0 if tables.same_policy(sampled, self._policy_id(step - 1)) else 1

    # ---- overlap: the next step's sampling beside this step's scoring and update ---------------

    _next_gen = None
    _switch_interval = None  # the interpreter's own, while the overlap's shorter one is set

    def _start_gen(self, step: int) -> None:
        """Sample step `step` on a thread with the sampling copy as it is (the policy before the
        current step's update); the copy is refreshed when the thread is joined. Meanwhile the
        interpreter hands the GIL over every OVERLAP_SWITCH_S instead of every 5 ms: the sampling
        thread needs it for a moment at each token (a graph replay) and would otherwise wait up to
        5 ms a token behind the main thread's Python (benchmarks/bench_switch_interval.py)."""
        d = step_dir(self.run_dir, step)
        if self.main:
            self.feed.job(step).run(StageOptions(out=d / "prompts", quiet=True))
        self._barrier()
        if self._switch_interval is None:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(OVERLAP_SWITCH_S)
        self._next_gen = _Background(self._gen_on_own_stream, step, self.sampler)

    def _join_overlap(self) -> None:
        """Wait for the background sampling; its failure is raised here."""
        pending, self._next_gen = self._next_gen, None
        if pending is not None:
            pending.join()
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None
        if pending is not None and pending.error is not None:
            raise pending.error

    # ---- weights: the sampling copy, checkpoints ------------------------------------------------

    def _policy_id(self, step: int) -> str:
        return resident_policy_id(self.run_dir, self.base_id, self.settings_hash, step)

    def _policy_step(self, step: int) -> int:
        """The step the samples record (gen's policy_step) for the policy after `step` updates: as
        its id says, the RL step, and the initial policy's own step before any update (a resumed run
        records what an uninterrupted one does)."""
        return step if step else int(self.policy_meta.get("step", 0))

    def _sampling_copy(self, pid: str) -> Policy:
        """The policy gen samples with: a copy of the trained weights in the sampling dtype, in eval
        mode with the KV cache on (the trained model computes in float32 under autocast)."""
        dev, dt = resolve_device_dtype(self.opts.device, self.opts.dtype)
        if self.opts.lora_rank:  # the initial policy with the adapter's deltas merged in
            model = load_policy(self.policy_dir, device=str(dev), dtype=str(dt).removeprefix("torch.")).model
            self.learner.copy_merged_into(model)
        else:
            model = copy.deepcopy(self.learner.model).to(dtype=dt)
        model.eval()
        model.config.use_cache = True
        for p in model.parameters():
            p.requires_grad_(False)
        return dataclasses.replace(self.learner.policy, model=model, policy_id=pid,
                                   step=self._policy_step(self.learner.rl_step))

    def _sync_sampler(self) -> None:
        """The learner's weights into the sampling copy (a device-to-device copy, cast); never
        while the copy samples (overlap joins its thread first)."""
        learner = self.learner
        from accelerate.utils import DistributedType
        if self.opts.lora_rank:
            learner.copy_merged_into(self.sampler.model)
        else:
            if learner.acc.distributed_type == DistributedType.FSDP:
                weights = learner.full_state()[0]
            else:
                weights = learner.model.state_dict()
            with torch.no_grad():
                self.sampler.model.load_state_dict(weights, strict=False)
        self.sampler = dataclasses.replace(self.sampler, policy_id=self._policy_id(learner.rl_step),
                                           step=self._policy_step(learner.rl_step))

    def _checkpoint(self, step: int) -> None:
        if step <= self.saved_step or step != self.learner.rl_step:
            return
        learner, o = self.learner, self.opts
        adapter = None
        if o.lora_rank:  # the adapter every time; the merged policy where a command will load it
            adapter_weights, opt_state = learner.lora_state()
            adapter = (learner.model, adapter_weights)
            wanted = step == o.steps or (o.eval_every and step % o.eval_every == 0)
            weights = learner.merged_weights() if wanted else None
        else:
            weights, opt_state = learner.full_state()
        if self.main:
            state = {"step": step, "optimizer_updates": learner.optimizer_updates,
                     "policy_id": self._policy_id(step), "settings_hash": self.settings_hash,
                     "prompts": self.feed.position(step + 1), "saved_at": time.time()}
            protect = self.opts.eval_every
            model = learner.model.get_base_model() if o.lora_rank else learner.model_to_save()
            save_checkpoint(self.run_dir, step, model, weights, opt_state, learner.policy,
                            learner.meta, learner.initial, state, keep=self.opts.keep_checkpoints,
                            protect=(lambda s: s % protect == 0) if protect else None, adapter=adapter)
        self._barrier()
        self.saved_step = step

    # ---- held-out scoring, reporting -------------------------------------------------------------

    def _start_eval(self, step: int, progress: Progress) -> None:
        """`rl3d eval` of the step's checkpoint in a child process, beside the training steps."""
        if not self.main:
            return
        o = self.opts
        out = self.run_dir / "eval" / f"step-{step:06d}"
        argv = [sys.executable, "-m", "rl3d.cli.main", "eval", "--bench", o.eval_bench, "--policy",
                str(checkpoint_dir(self.run_dir, step)), "--out", str(out), "--seed", str(o.seed), "--quiet"]
        if o.eval_limit:
            argv += ["--limit", str(o.eval_limit)]
        if o.device:
            argv += ["--device", o.device]
        out.parent.mkdir(parents=True, exist_ok=True)
        progress.log(f"train: held-out eval of step {step} on {o.eval_bench} started ({out})")
        with open(out.parent / f"step-{step:06d}.log", "w") as log:
            self.evals.append((step, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)))

    def _wait_evals(self, progress: Progress) -> dict:
        out = {}
        for step, proc in self.evals:
            rc = proc.wait()
            out[step] = rc
            if rc != 0:
                progress.log(f"WARNING: held-out eval of step {step} failed (exit {rc}): see "
                             f"{self.run_dir / 'eval' / f'step-{step:06d}.log'}")
        return out

    def _tensorboard(self, step: int, metrics: dict, phases: dict) -> None:
        if self.opts.tensorboard and self.main:
            write_tensorboard(self.opts.tensorboard, step, {**metrics, **{f"time_{k}_s": v for k, v in phases.items()}})

    # ---- processes, pools and signals ------------------------------------------------------------

    def _barrier(self) -> None:
        self.learner.acc.wait_for_everyone()

    def _pools(self):
        """Worker pools kept for the whole run (spawned once: each worker imports rl3d once)."""
        cores = usable_cores()
        render = (worker_pool(self.opts.render_backend) if cores > 1 and self.opts.meshes
                  and "render" not in self.opts.stages else None)
        reward = host_pool() if cores > 2 and "reward" not in self.opts.stages else None
        return render, reward

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            self.stop = signal.Signals(signum).name

        return {s: signal.signal(s, handler) for s in STOP_SIGNALS}

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    def _check_stop(self) -> None:
        """Stop at a stage boundary once a stop signal arrived or --time-limit passed (in any process
        of a launch)."""
        if self.stop is None and self.opts.time_limit > 0 and time.time() - self.t_start >= self.opts.time_limit:
            self.stop = "time limit"
        flag = self.stop is not None
        if self.learner.acc.num_processes > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.learner.acc.device)
            flag = bool(self.learner.acc.reduce(t, reduction="sum").item() > 0)
            self.stop = self.stop or ("SIGTERM" if flag else None)
        if flag:
            raise StopRequested()


def write_update_record(record: Path, adv_rows, metrics: dict, config: dict, policy: str) -> None:
    """RUN/step-N/update: the step's advantages and metrics tables and update.json (written last,
    inside a folder renamed into place: the record is whole or absent)."""
    tmp = record.with_name(f".{record.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    adv, mt = update_tables(adv_rows, metrics, config, policy)
    shards_io.write_part(adv, tmp / "advantages", Shard(0, 1))
    shards_io.write_part(mt, tmp / "metrics", Shard(0, 1))
    shards_io.atomic_write_json(tmp / UPDATE_DONE, {"config": config, "metrics": metrics,
                                                    "summary": summary_fields(metrics)})
    if record.exists():
        shutil.rmtree(record)
    tmp.rename(record)


# The GIL's switch interval while a step samples beside the main thread (--overlap 1): on the 2-core
# box 0.2 ms kept a thread that needs the GIL for microseconds between device waits at ~2x its time
# alone beside a thread running Python nonstop (5 ms: ~19x), which kept ~88% of its own speed.
OVERLAP_SWITCH_S = 0.0002


class _Background(threading.Thread):
    """A function on a thread whose exception is kept for the joiner."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.error = fn, args, None
        self.start()

    def run(self):
        try:
            self.fn(*self.args)
        except BaseException as e:  # re-raised by the loop when it joins
            self.error = e

