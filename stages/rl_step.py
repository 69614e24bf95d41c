"""`rl3d rl-step`: one Hi-GRPO (or GRPO) policy update from a samples table and a rewards table.

Read top to bottom: load -> advantages -> models -> reference log-probs -> (recomputed old
log-probs) -> optimizer steps -> metrics -> checkpoint. The library it calls is stages/rl/:
advantages.py, loss.py (the loss, docs/rl.md), update.py (the scoring passes and the minibatch /
micro-batch loop), processes.py (multi-process bookkeeping).
"""
from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from rl3d.formats import shards as shards_io
from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.stages.contract import Progress
from rl3d.stages.policy.checkpoint import (VISION_MODULES, carried_meta, freeze_vision, load_optimizer_state,
                                           load_policy, policy_id, read_policy_meta, rng_state, save_policy)
from rl3d.stages.policy.device import resolve_device_dtype
from rl3d.stages.policy.sampler import CompletionLogprobs
from rl3d.stages.policy.sequence import LEVELS
from rl3d.stages.rl import processes
from rl3d.stages.rl.advantages import compute_advantages
from rl3d.stages.rl.config import RLConfig
from rl3d.stages.rl.inputs import check_step_inputs, learned_nothing
from rl3d.stages.rl.loss import diagnostics, mismatch_metrics
from rl3d.stages.rl.update import (UpdateStats, attention_without_cudnn, recompute_old_logprobs, reference_logprobs,
                                   run_updates)
from rl3d.stages.scoring.run_metrics import write_tensorboard

__all__ = ["RLConfig", "run_rl_step", "append_run_metrics", "DONE_FILE"]

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
    timings: dict[str, float] = {"startup_s": startup_s}
    torch.manual_seed(cfg.seed)

    # 1. data: samples joined with rewards -> advantages -> the samples that train
    check_batch(samples_path, rewards_path, policy_dir, allow_off_policy, progress, allow_unverified)
    samples, rewards = _read_batch(samples_path, rewards_path)
    adv_rows, adv_stats = compute_advantages(
        samples, algo=cfg.algo, lam=cfg.lam, adv_std=cfg.adv_std, std_eps=cfg.std_eps,
        dynamic_sampling=cfg.dynamic_sampling, min_std=cfg.min_std, failed_rewards=cfg.failed_rewards,
        failed_penalty=cfg.failed_penalty, train_levels=cfg.train_levels)
    kept = _kept_samples(samples, adv_rows)
    timings["load_s"] = time.time() - t0
    progress.log(f"rl-step: {len(kept)} of {len(samples)} samples train ({adv_stats['groups']} groups, "
                 f"{adv_stats['dropped_failed'] + adv_stats['dropped_no_spread']} dropped); loading the policy")

    # 2. models: the policy being trained, and the frozen reference for the KL term
    t_models = time.time()
    device_type = resolve_device_dtype(device)[0].type
    use_bf16 = device_type == "cuda" and (dtype in (None, "bfloat16"))
    acc = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=device_type == "cpu")
    # under a distributed launch each process owns one GPU (acc.device); "cuda" alone would mean cuda:0
    on = str(acc.device) if acc.num_processes > 1 or device is None else device
    policy = load_policy(policy_dir, device=on, dtype="float32")
    meta = policy.meta
    model = policy.model
    freeze_vision(model)  # text-only policy: a VLM's vision tower and projector stay fixed
    if lora_rank:
        model = _with_lora(model, lora_rank)
    if cfg.gradient_checkpointing:  # the newer name where transformers has it (the old one warns)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    model.config.use_cache = False
    special = policy.special
    initial = ref_dir or meta.get("initial_policy") or str(Path(policy_dir).resolve())
    ref_model = None
    if cfg.beta > 0 and kept:
        # the frozen reference needs no fp32 master weights: bf16 where the step computes in bf16
        ref_model = load_policy(initial, device=str(policy.device),
                                dtype="bfloat16" if use_bf16 else "float32").model.eval()
        if acc.num_processes > 1:
            processes.broadcast_from_main(ref_model)
    fused = use_fused_adamw(model, cfg, acc)
    opt = make_optimizer(model, cfg, fused)
    # log-probs must use the temperature the samples were drawn with (gen records it per row)
    sampled_at = float(samples[0].get("temperature") or 1.0) if samples else 1.0
    temperature = cfg.temperature or sampled_at
    # the trained module is the whole log-prob computation, so a DDP wrapper sees every forward
    scorer, opt = acc.prepare(CompletionLogprobs(model, special, temperature), opt)
    parent_opt = Path(policy_dir) / "optimizer.pt"
    if parent_opt.exists() and not lora_rank:
        processes.load_optimizer_state(scorer, opt, load_optimizer_state(parent_opt))
        set_fused(opt, fused)  # the parent's state carries its own run's kernel choice
    ref_scorer = CompletionLogprobs(ref_model, special, temperature) if ref_model is not None else None
    timings["model_load_s"] = time.time() - t_models

    # 3. reference log-probs once (no grad), then epochs x minibatches of optimizer steps
    for r in kept:
        r.setdefault("reasoning_truncated", False)
    updates_before = int(meta.get("optimizer_updates", 0))  # the warm-up continues across steps
    with attention_without_cudnn():
        t1 = time.time()
        if ref_scorer is not None:
            progress.log(f"rl-step: reference log-probs of {len(kept)} samples")
            reference_logprobs(kept, ref_scorer, special, acc, cfg.micro_batch, cfg.length_buckets)
        timings["ref_s"] = time.time() - t1
        t_old = time.time()
        mismatch = None
        if cfg.old_logprobs == "recompute" and kept:
            progress.log(f"rl-step: recomputing the old log-probs of {len(kept)} samples")
            mismatch = recompute_old_logprobs(kept, scorer, special, acc, cfg)
        timings["old_s"] = time.time() - t_old
        t2 = time.time()
        minibatches = -(-len(kept) // (cfg.minibatch or max(len(kept), 1))) * cfg.epochs if kept else 0
        progress.log(f"rl-step: {minibatches} optimizer update(s) ({cfg.epochs} epoch(s)), reference took "
                     f"{timings['ref_s']:.0f}s")
        stats = run_updates(kept, scorer, opt, acc, special, cfg, ref_scorer is not None, updates_before)
        if mismatch is not None:
            stats.mismatch = mismatch
        timings["update_s"] = time.time() - t2
        progress.log(f"rl-step: {stats.n_updates} update(s) in "
                     f"{timings['update_s']:.0f}s; writing the checkpoint")

    # 4. metrics, collapse warnings, checkpoint
    if stats.skipped_updates:
        progress.log(f"WARNING: skipped {stats.skipped_updates} update(s) with a non-finite gradient norm")
    metrics = _metrics(samples, adv_rows, adv_stats, kept, stats, timings, meta, cfg, rewards)
    warnings = _collapse_warnings(metrics, run_metrics)
    nothing = learned_nothing(kept, stats.n_updates, stats.skipped_updates)  # loud, and a metric
    warnings = [nothing] + warnings if nothing else warnings
    metrics["learned_nothing"] = int(nothing is not None)
    for w_ in warnings:
        progress.log(f"WARNING: {w_}")
    metrics["skipped_updates"] = stats.skipped_updates
    metrics["lr"] = float(np.mean(stats.lrs)) if stats.lrs else 0.0
    metrics["optimizer_updates"] = updates_before + stats.n_updates
    metrics["warnings"] = "; ".join(warnings)
    t3 = time.time()
    # full weights and optimizer state, gathered by every process (under FSDP each holds a shard)
    weights, opt_state = (None, None) if lora_rank else processes.full_state(scorer, opt)
    if acc.is_main_process:
        model_to_save = acc.unwrap_model(scorer).model
        if lora_rank:
            model_to_save = model_to_save.merge_and_unload()
        try:
            _save_checkpoint(out, model_to_save, weights, opt_state, policy, cfg, meta, initial, adv_rows, metrics,
                             samples_path, rewards_path, run_metrics, overwrite, started=t3)
        except BaseException:  # a failed save leaves no half checkpoint behind (a kill leaves it for the rerun)
            shutil.rmtree(out.with_name(f".{out.name}.rl-tmp"), ignore_errors=True)
            raise
        if tensorboard:
            write_tensorboard(tensorboard, metrics["step"], metrics)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        metrics["save_s"] = round(time.time() - t3, 3)
    return {"stage": "rl-step", "out": str(out), "skipped": False, "step": metrics["step"],
            "seconds": round(time.time() - t0, 2), **{k: metrics[k] for k in
            ("loss", "kl", "reward_mean_coarse", "reward_mean_fine", "reward_mean_single", "kept_samples",
             "dropped_groups", "grad_norm", "learned_nothing", "mismatch_abs_mean", "mismatch_abs_max",
             "mismatch_clip_frac", *TIMERS) if k in metrics}}


# per-phase seconds in the metrics and the summary (docs/rl.md)
TIMERS = ("startup_s", "load_s", "model_load_s", "ref_s", "old_s", "update_s", "save_s", "wall_s")


def use_fused_adamw(model, cfg: RLConfig, acc) -> bool:
    """torch's fused AdamW (one kernel launch for all weights instead of several per tensor) when
    asked and every trained weight is a CUDA tensor. Not under FSDP, whose wrapper replaces the
    parameters after the optimizer is made."""
    params = [p for p in model.parameters() if p.requires_grad]
    return (cfg.fused_adamw and bool(params) and all(p.is_cuda for p in params)
            and acc.distributed_type != DistributedType.FSDP)


def make_optimizer(model, cfg: RLConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW over the trained weights (fused: see use_fused_adamw)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                             **({"fused": True} if fused else {}))


def set_fused(opt, fused: bool) -> None:
    """This run's AdamW kernel after loading a parent's state: load_state_dict takes every setting
    of the saved groups, so a parent written on another device (or before the fused kernel) would
    pick the kernel. The step counters go where the kernel keeps them (fused: on the weight's
    device; plain: on the CPU). Groups that already agree are left as they are (same bytes)."""
    inner = getattr(opt, "optimizer", opt)
    for group in inner.param_groups:
        if bool(group.get("fused")) == fused:
            continue
        group["fused"] = True if fused else None
        for p in group["params"]:
            state = inner.state.get(p, {})
            if "step" in state:
                state["step"] = state["step"].to(dtype=torch.float32, device=p.device if fused else "cpu")


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


def _read_batch(samples_path, rewards_path) -> tuple[list[dict], dict[str, dict]]:
    """The samples table's rows, each with its reward's total (None when the sample or its reward
    failed), and the rewards by sample id."""
    samples = tables.read_table(samples_path, "samples").to_pylist()
    rewards = {r["sample_id"]: r for r in tables.read_table(rewards_path, "rewards").to_pylist()}
    missing = [s["sample_id"] for s in samples if s["sample_id"] not in rewards]
    if missing:
        raise InputError(f"{rewards_path}: no reward row for sample {missing[0]} ({len(missing)} missing)")
    for s in samples:
        r = rewards[s["sample_id"]]
        s["total"] = r["total"] if s["status"] == "ok" and r["status"] == "ok" else None
        s["reward_status"], s["reward_message"] = r["status"], r["message"]
    return samples, rewards


def _kept_samples(samples: list[dict], adv_rows) -> list[dict]:
    """The samples whose group was kept, in advantage-row order, each with its advantage."""
    by_id = {s["sample_id"]: s for s in samples}
    kept = []
    for a in adv_rows:
        if a.kept:
            by_id[a.sample_id]["advantage"] = a.advantage
            kept.append(by_id[a.sample_id])
    return kept


def _with_lora(model, rank: int):
    try:
        from peft import LoraConfig, get_peft_model  # optional (the lora extra): only for --lora-rank
    except ImportError:
        raise InputError("--lora-rank needs peft: pip install 'rl3d[lora]'") from None
    has_vision = any(n.split(".")[-1] in VISION_MODULES for n, _ in model.named_modules())
    # no adapters on a vision-language policy's (frozen) vision tower and projector
    vision = {"exclude_modules": rf"(.*\.)?({'|'.join(VISION_MODULES)})\..*"} if has_vision else {}
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0, **vision)
    return get_peft_model(model, cfg)


def _metrics(samples, adv_rows, adv_stats, kept, stats: UpdateStats, timings, meta, cfg, rewards) -> dict:
    sums, level_loss, grad_norms = stats.sums, stats.level_loss, stats.grad_norms
    n_updates, n_tokens = stats.n_updates, stats.n_tokens
    m: dict = {"step": int(meta.get("rl_step", 0)) + 1, "updates": n_updates, "kept_samples": len(kept),
               "samples": len(samples), "dropped_groups": adv_stats["dropped_failed"] + adv_stats["dropped_no_spread"],
               "dropped_failed": adv_stats["dropped_failed"], "dropped_no_spread": adv_stats["dropped_no_spread"],
               "penalized_failed": adv_stats["penalized_failed"],
               "groups": adv_stats["groups"]}
    m["loss"] = sum(level_loss.values()) / max(cfg.epochs, 1)
    for lv, v in level_loss.items():
        if any(r["level"] == lv for r in kept):
            m[f"loss_{lv}"] = v / max(cfg.epochs, 1)
    n_mb = max(n_updates, 1)
    m["pg_loss"] = sums.get("pg", 0.0) / n_mb
    for k in diagnostics(cfg):
        if k != "pg":  # pg_loss above
            m[k] = sums.get(k, 0.0) / n_mb
    m["grad_norm"] = float(np.mean(grad_norms)) if grad_norms else 0.0
    # entropy estimate: mean negative log-prob of the sampled tokens (an unbiased estimate of the
    # per-token entropy of the sampling distribution) over the tokens that carry a choice
    nll = {"reasoning": 0.0, "mesh": 0.0}
    cnt = {"reasoning": 0, "mesh": 0}
    for s in samples:
        lp = np.asarray(s["logprobs"], np.float64)
        split = s["reasoning_end"] + 1 - s["prompt_len"]  # reasoning tokens and <mesh-start>
        for part, x in (("reasoning", lp[:split]), ("mesh", lp[split: s["mesh_end"] - s["prompt_len"]])):
            nll[part] -= x.sum()
            cnt[part] += len(x)
    m["entropy"] = sum(nll.values()) / max(sum(cnt.values()), 1)
    m["entropy_reasoning"] = nll["reasoning"] / max(cnt["reasoning"], 1)
    m["entropy_mesh"] = nll["mesh"] / max(cnt["mesh"], 1)
    for lv in LEVELS:
        vals = [s["total"] for s in samples if s["level"] == lv and s["total"] is not None]
        if vals:
            m[f"reward_mean_{lv}"] = float(np.mean(vals))
            m[f"reward_std_{lv}"] = float(np.std(vals))
        advs = [a.advantage for a in adv_rows if a.level == lv and a.kept]
        if advs:
            m[f"adv_mean_{lv}"], m[f"adv_std_{lv}"] = float(np.mean(advs)), float(np.std(advs))
            m[f"adv_abs_max_{lv}"] = float(np.max(np.abs(advs)))
    # reward terms: mean raw value per term and level (columns <term>_raw in the rewards table)
    for r in rewards.values():
        for k, v in r.items():
            if k.endswith("_raw") and isinstance(v, (int, float)) and v is not None:
                key = f"term_{k[:-4]}_{r['level']}"
                m.setdefault(key, []).append(float(v))
    for k in [k for k in m if k.startswith("term_")]:
        m[k] = float(np.mean(m[k]))
    m["diversity_identical_frac"] = _identical_fraction(samples)
    m["tokens"] = n_tokens
    m.update(stats.mismatch or mismatch_metrics({}))  # zeros and mismatch_tokens 0 when nothing trained
    total_s = sum(timings.values())
    m["tokens_per_s"] = n_tokens / max(timings.get("update_s", 0.0), 1e-9)
    m.update({k: round(v, 3) for k, v in timings.items()})
    m["wall_s"] = round(total_s, 3)
    return m


def _identical_fraction(samples) -> float:
    """Fraction of (prompt, level) groups whose samples all produced the same mesh tokens."""
    groups: dict = {}
    for s in samples:
        groups.setdefault((s["prompt_id"], s["level"]), []).append(tuple(s["mesh_tokens"] or ()))
    multi = [g for g in groups.values() if len(g) > 1]
    return float(np.mean([len(set(g)) == 1 for g in multi])) if multi else 0.0


def _collapse_warnings(m: dict, run_metrics: str | None) -> list[str]:
    out = []
    if m["diversity_identical_frac"] >= 0.5:
        out.append(f"within-group diversity collapsed: {m['diversity_identical_frac']:.0%} of groups sampled "
                   f"identical meshes (mode collapse; consider fewer RL steps, higher temperature or a larger beta)")
    if run_metrics and Path(run_metrics).exists():
        prev = pq.read_table(run_metrics).to_pylist()
        first = [r["value"] for r in prev if r["name"] == "entropy"]
        if first and m["entropy"] < 0.5 * first[0]:
            out.append(f"entropy collapsed: {m['entropy']:.3f} nats/token vs {first[0]:.3f} at the run's first step")
    return out


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
    extra["sft_step"] = meta.get("sft_step", meta.get("step", 0) if "rl_step" not in meta else 0)
    tmp.mkdir(parents=True)
    with ThreadPoolExecutor(max_workers=1) as writer:
        # none for LoRA: the adapter is merged on save
        opt_written = writer.submit(torch.save, opt_state, tmp / "optimizer.pt") if opt_state is not None else None
        # save_policy writes into a temp dir of its own and renames it onto `weights_dir`
        weights_dir = tmp / ".weights"
        save_policy(weights_dir, model, policy.tokenizer, policy.codec, step=meta.get("step", 0),
                    base=meta.get("base"), codec_ref=None, extra=extra, state_dict=weights)
        if opt_written is not None:
            opt_written.result()  # re-raises a failed write
    for f in weights_dir.iterdir():
        f.rename(tmp / f.name)
    weights_dir.rmdir()
    torch.save(rng_state(), tmp / "rng_state.pt")
    metrics["save_s"] = round(time.time() - started, 3)
    metrics["wall_s"] = round(metrics.get("wall_s", 0.0) + metrics["save_s"], 3)
    adv = pa.table({"sample_id": [a.sample_id for a in adv_rows], "prompt_id": [a.prompt_id for a in adv_rows],
                    "sample_index": pa.array([a.sample_index for a in adv_rows], pa.int32()),
                    "level": [a.level for a in adv_rows], "reward": [a.reward for a in adv_rows],
                    "advantage": [a.advantage for a in adv_rows], "kept": [a.kept for a in adv_rows],
                    "reason": [a.reason for a in adv_rows]})
    config = {"rl": asdict(cfg), "samples": str(samples_path), "rewards": str(rewards_path), "policy": str(policy.path)}
    shards_io.write_part(tables.with_metadata(adv, "advantages", config, policy.policy_id), tmp / "advantages",
                         shards_io.Shard(0, 1))
    rows = [(k, float(v)) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    mt = pa.table({"step": pa.array([metrics["step"]] * len(rows), pa.int64()), "name": [k for k, _ in rows],
                   "value": [v for _, v in rows]})
    mt = tables.with_metadata(mt, "metrics", config, policy.policy_id)
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


def append_run_metrics(path: Path, rows: pa.Table) -> None:
    """Append a step's metric rows to the run-level Parquet (rewritten atomically); a rerun of the
    same step replaces that step's rows instead of duplicating them."""
    step = rows.column("step")[0].as_py()
    # one rl-step writes a run's metrics at a time: a temp file beside it is a killed earlier write
    for stale in path.parent.glob(f".tmp-*-{path.name}"):
        stale.unlink(missing_ok=True)
    if path.exists():
        old = pq.read_table(path)
        old = old.filter(pc.not_equal(old.column("step"), step))
        rows = pa.concat_tables([old.select(rows.column_names).cast(rows.schema), rows])
    with shards_io.atomic_path(path) as tmp:
        pq.write_table(rows, tmp)


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
