"""`rl3d rl-step`: one Hi-GRPO (or GRPO) policy update from a samples table and a rewards table.

Read top to bottom: load -> advantages -> batches -> loss -> optimizer steps -> checkpoint.
The loss is `policy_loss` below; it is HI-GRPO.md's formula, per level, summed over levels.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from rl3d.formats import shards as shards_io
from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.stages.advantages import compute_advantages

# tokens that carry a choice: reasoning, <mesh-start> and mesh tokens (<mesh-end> and eos are forced)
LEVEL_ORDER = ("coarse", "fine", "single")


@dataclass
class RLConfig:
    algo: str = "hi-grpo"            # hi-grpo | grpo
    lam: float = 1.0                 # back-flow weight of R_low into R_high
    beta: float = 0.01               # k3 KL weight; 0 loads no reference
    kl_max: float = 0.0              # per-token k3 cap (10 = verl's low_var_kl); 0 = uncapped, as HI-GRPO.md
    clip_low: float = 0.2
    clip_high: float = 0.28
    loss_agg: str = "token"          # token | sequence | dr-grpo
    ratio: str = "token"             # token | sequence (GSPO)
    adv_std: str = "group"           # group | none
    std_eps: float = 1e-4
    epochs: int = 1
    minibatch: int = 0               # sequences per optimizer step; 0 = the whole batch
    micro_batch: int = 8             # sequences per forward pass (gradient accumulation; exact)
    lr: float = 1e-6
    warmup_updates: int = 0          # linear LR warm-up over the run's first N optimizer updates
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dynamic_sampling: str = "off"    # off | zero-std | min-std
    min_std: float = 0.0
    failed_rewards: str = "drop-group"  # drop-group | error | penalty
    failed_penalty: float = 0.0      # the total a policy failure (empty mesh) gets under "penalty"
    gradient_checkpointing: bool = False
    seed: int = 0
    temperature: float | None = None  # None: the temperature the samples were drawn with


# --------------------------------------------------------------------------------------------
# The loss (HI-GRPO.md):  L_k = -(1/sum_i |y_k,i|) sum_i sum_t [min(r A, clip(r) A) - beta KL3]
# --------------------------------------------------------------------------------------------
def policy_loss(logp, old_logp, ref_logp, adv, weights, cfg: RLConfig):
    """Per-token objective summed with `weights` (which encode the aggregation and 1/|y|).

    logp, old_logp, ref_logp, weights: [B, T] (weights 0 on padding and forced tokens); adv: [B].
    Returns (loss, parts) where parts hold detached diagnostics.
    """
    mask = weights > 0
    log_ratio = (logp - old_logp).masked_fill(~mask, 0.0)
    if cfg.ratio == "sequence":  # GSPO: one geometric-mean ratio per sequence, shared by its tokens
        n = mask.sum(1).clamp(min=1)
        log_ratio = (log_ratio.sum(1) / n)[:, None].expand_as(logp)
    ratio = torch.exp(log_ratio.clamp(max=20.0))  # bound exp() so one stale token cannot overflow
    a = adv[:, None]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high) * a
    pg = torch.minimum(unclipped, clipped)
    if cfg.beta > 0:
        d = (ref_logp - logp).clamp(-20.0, 20.0)
        kl = torch.exp(d) - d - 1  # k3 estimator of KL(pi_theta || pi_ref), >= 0
        if cfg.kl_max > 0:
            # a few sampled tokens the policy has pushed far below the reference would otherwise
            # give k3 ~ e^20 and gradients that swamp the policy-gradient term (seen at lr 1e-4)
            kl = kl.clamp(max=cfg.kl_max)
    else:
        kl = torch.zeros_like(logp)
    per_row = -((pg - cfg.beta * kl) * weights).sum(1)
    loss = per_row.sum()
    with torch.no_grad():
        w = weights / weights.sum().clamp(min=1e-12)
        parts = {
            "pg": float(-(pg * weights).sum()),
            "kl": float((kl * w).sum()),
            "clip_low_frac": float((((ratio < 1 - cfg.clip_low) & (a < 0)).float() * w).sum()),
            "clip_high_frac": float((((ratio > 1 + cfg.clip_high) & (a > 0)).float() * w).sum()),
            "ratio_mean": float((ratio * w).sum()),
            "row_loss": per_row.detach(),
        }
    return loss, parts


def token_weights(loss_mask: torch.Tensor, level_ids: torch.Tensor, agg: str) -> torch.Tensor:
    """Aggregation weights so that sum(weights * objective) is the mean the loss asks for, per level.

    token:    1 / (all valid tokens of the level in the batch)            (DAPO)
    sequence: 1 / (|y_i| * sequences of the level)                         (GRPO)
    dr-grpo:  1 / (sequences of the level * longest completion of the level)
    Levels are summed (L = L_1 + L_2). Precomputed for the whole minibatch so micro-batching is exact.
    """
    m = loss_mask.float()
    w = torch.zeros_like(m)
    for lv in level_ids.unique():
        rows = level_ids == lv
        lens = m[rows].sum(1)
        if agg == "token":
            w[rows] = m[rows] / lens.sum().clamp(min=1)
        elif agg == "sequence":
            w[rows] = m[rows] / (lens.clamp(min=1)[:, None] * rows.sum())
        elif agg == "dr-grpo":
            w[rows] = m[rows] / (rows.sum() * lens.max().clamp(min=1))
        else:
            raise ValueError(f"unknown loss aggregation {agg!r}")
    return w


def warmup_lr(lr: float, update_index: int, warmup_updates: int) -> float:
    """LR of the run's `update_index`-th optimizer update (0-based, counted across rl-steps).

    Adam's first updates move every weight by about lr whatever its gradient; without a ramp a
    peaked policy can jump far from its reference in the first step (seen on the H100 at lr 2e-4).
    """
    if warmup_updates <= 0:
        return lr
    return lr * min(1.0, (update_index + 1) / warmup_updates)


# --------------------------------------------------------------------------------------------
# The step: load -> advantages -> optimizer steps over minibatches -> checkpoint
# --------------------------------------------------------------------------------------------
DONE_FILE = "rl_step.json"


def run_rl_step(policy_dir, samples_path, rewards_path, out, cfg: RLConfig, ref_dir=None,
                run_metrics: str | None = None, device=None, dtype=None, overwrite=False,
                lora_rank: int = 0, progress=None) -> dict:
    from rl3d.stages import policy as pol
    from rl3d.stages.contract import Progress

    progress = progress or Progress()
    out = Path(out)
    if (out / DONE_FILE).exists() and not overwrite:
        progress.log(f"rl-step: {out} is already a complete checkpoint, skipping (use --overwrite to redo)")
        return {"stage": "rl-step", "out": str(out), "skipped": True}
    t0 = time.time()
    timings: dict[str, float] = {}
    torch.manual_seed(cfg.seed)

    # 1. data: samples joined with rewards -> advantages
    samples = tables.read_table(samples_path, "samples").to_pylist()
    rewards = {r["sample_id"]: r for r in tables.read_table(rewards_path, "rewards").to_pylist()}
    missing = [s["sample_id"] for s in samples if s["sample_id"] not in rewards]
    if missing:
        raise InputError(f"{rewards_path}: no reward row for sample {missing[0]} ({len(missing)} missing)")
    for s in samples:
        r = rewards[s["sample_id"]]
        s["total"] = r["total"] if s["status"] == "ok" and r["status"] == "ok" else None
        s["reward_status"], s["reward_message"] = r["status"], r["message"]
    adv_rows, adv_stats = compute_advantages(
        samples, algo=cfg.algo, lam=cfg.lam, adv_std=cfg.adv_std, std_eps=cfg.std_eps,
        dynamic_sampling=cfg.dynamic_sampling, min_std=cfg.min_std, failed_rewards=cfg.failed_rewards,
        failed_penalty=cfg.failed_penalty)
    by_id = {s["sample_id"]: s for s in samples}
    kept = []
    for a in adv_rows:
        if a.kept:
            by_id[a.sample_id]["advantage"] = a.advantage
            kept.append(by_id[a.sample_id])
    timings["load_s"] = time.time() - t0

    # 2. models: the policy being trained, and the frozen reference for the KL term
    from accelerate import Accelerator

    device_type = pol.resolve_device_dtype(device)[0].type
    use_bf16 = device_type == "cuda" and (dtype in (None, "bfloat16"))
    acc = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=device_type == "cpu")
    # under a distributed launch each process owns one GPU (acc.device); "cuda" alone would mean cuda:0
    on = str(acc.device) if acc.num_processes > 1 or device is None else device
    policy = pol.load_policy(policy_dir, device=on, dtype="float32")
    meta = policy.meta
    model = policy.model
    if lora_rank:
        model = _with_lora(model, lora_rank)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    model.config.use_cache = False
    special = pol.special_ids(policy.tokenizer, policy.codec, pol.model_vocab_size(policy.model), str(policy_dir))
    initial = ref_dir or meta.get("initial_policy") or str(Path(policy_dir).resolve())
    ref_model = None
    if cfg.beta > 0 and kept:
        ref_model = pol.load_policy(initial, device=str(policy.device), dtype="float32").model.eval()
        if acc.num_processes > 1:
            _broadcast_from_main(ref_model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    # log-probs must use the temperature the samples were drawn with (gen records it per row)
    sampled_at = float(samples[0].get("temperature") or 1.0) if samples else 1.0
    temperature = cfg.temperature or sampled_at
    # the trained module is the whole log-prob computation, so a DDP wrapper sees every forward
    scorer, opt = acc.prepare(pol.CompletionLogprobs(model, special, temperature), opt)
    parent_opt = Path(policy_dir) / "optimizer.pt"
    if parent_opt.exists() and not lora_rank:
        _load_optimizer_state(scorer, opt, torch.load(parent_opt, map_location="cpu", weights_only=True))
    ref_scorer = pol.CompletionLogprobs(ref_model, special, temperature) if ref_model is not None else None

    # 3. reference log-probs once (no grad), then epochs x minibatches of optimizer steps
    def forward(rows, net):
        b = pol.collate(rows, special, device=acc.device)
        with acc.autocast(), _attention_without_cudnn():
            lp, _ = net(b["input_ids"], b["attention_mask"], b["prompt_lens"], b["kinds"])
        return lp, b["kinds"]

    for r in kept:
        r.setdefault("reasoning_truncated", False)
    t1 = time.time()
    if ref_model is not None:
        with torch.no_grad():
            for i in range(0, len(kept), cfg.micro_batch):
                chunk = kept[i:i + cfg.micro_batch]
                lp, kinds = forward(chunk, ref_scorer)
                for r, row_lp, n in zip(chunk, lp.cpu(), (kinds != pol.KIND_PAD).sum(1).tolist()):
                    r["ref_logp"] = row_lp[:n]
    timings["ref_s"] = time.time() - t1

    t2 = time.time()
    gen = torch.Generator().manual_seed(cfg.seed)
    mb_size = cfg.minibatch or len(kept)
    sums: dict[str, float] = {}
    level_loss = {lv: 0.0 for lv in LEVEL_ORDER}
    grad_norms, n_updates, n_tokens, skipped_updates = [], 0, 0, 0
    updates_before = int(meta.get("optimizer_updates", 0))  # the warm-up continues across steps
    lrs = []
    for epoch in range(cfg.epochs if kept else 0):
        order = torch.randperm(len(kept), generator=gen).tolist() if cfg.epochs > 1 or cfg.minibatch else list(range(len(kept)))
        for s in range(0, len(order), mb_size):
            mb = [kept[i] for i in order[s:s + mb_size]]
            mb_kinds = [_loss_mask(r, pol) for r in mb]
            lens = torch.tensor([int(m.sum()) for m in mb_kinds])
            levels = torch.tensor([LEVEL_ORDER.index(r["level"]) for r in mb])
            width = max(len(m) for m in mb_kinds)
            mask = torch.zeros(len(mb), width, dtype=torch.bool)
            for i, m in enumerate(mb_kinds):
                mask[i, :len(m)] = m
            weights_all = token_weights(mask, levels, cfg.loss_agg)
            mine = list(range(acc.process_index, len(mb), acc.num_processes))
            n_micro = math.ceil(math.ceil(len(mb) / acc.num_processes) / cfg.micro_batch)
            # diagnostics of this update, kept only if it is applied
            mb_sums = dict.fromkeys(("pg", "kl", "clip_low_frac", "clip_high_frac", "ratio_mean"), 0.0)
            mb_level_loss = {lv: 0.0 for lv in LEVEL_ORDER}
            for m in range(n_micro):
                idx = mine[m * cfg.micro_batch:(m + 1) * cfg.micro_batch] or mine[:1] or [0]
                dummy = not mine[m * cfg.micro_batch:(m + 1) * cfg.micro_batch]
                rows = [mb[i] for i in idx]
                lp, kinds = forward(rows, scorer)
                T = lp.shape[1]
                w = _fit(weights_all[idx], T).to(lp.device) * (0.0 if dummy else float(acc.num_processes))
                old = _stack([torch.as_tensor(r["logprobs"], dtype=torch.float32) for r in rows], T).to(lp.device)
                ref = _stack([r["ref_logp"] for r in rows], T).to(lp.device) if ref_model is not None else old
                adv = torch.tensor([r["advantage"] for r in rows], dtype=torch.float32, device=lp.device)
                loss, parts = policy_loss(lp, old, ref, adv, w, cfg)
                acc.backward(loss)
                if not dummy:
                    frac = float(w.sum()) / max(float(weights_all.sum()), 1e-12) / acc.num_processes
                    for k, v in parts.items():
                        if k != "row_loss":
                            # this process's share; w carries x num_processes for DDP's gradient mean
                            mb_sums[k] += v / acc.num_processes if k == "pg" else v * frac
                    for r, rl in zip(rows, parts["row_loss"].tolist()):
                        mb_level_loss[r["level"]] += rl / acc.num_processes
            mb_sums, mb_level_loss = _sum_over_processes(acc, mb_sums), _sum_over_processes(acc, mb_level_loss)
            norm = float(acc.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm))
            if not math.isfinite(norm):  # never apply a non-finite update; count it instead
                skipped_updates += 1
                opt.zero_grad(set_to_none=True)
                continue
            for k, v in mb_sums.items():
                sums[k] = sums.get(k, 0.0) + v
            for lv, v in mb_level_loss.items():
                level_loss[lv] += v
            grad_norms.append(norm)
            lrs.append(warmup_lr(cfg.lr, updates_before + n_updates, cfg.warmup_updates))
            for group in opt.param_groups:
                group["lr"] = lrs[-1]
            opt.step()
            opt.zero_grad(set_to_none=True)
            n_updates += 1
            n_tokens += int(lens.sum())
    timings["update_s"] = time.time() - t2

    # 4. metrics, collapse warnings, checkpoint
    if skipped_updates:
        progress.log(f"WARNING: skipped {skipped_updates} update(s) with a non-finite gradient norm")
    metrics = _metrics(samples, adv_rows, adv_stats, kept, sums, level_loss, grad_norms, n_updates,
                       n_tokens, timings, meta, cfg, rewards)
    warnings = _collapse_warnings(metrics, run_metrics)
    for w_ in warnings:
        progress.log(f"WARNING: {w_}")
    metrics["skipped_updates"] = skipped_updates
    metrics["lr"] = float(np.mean(lrs)) if lrs else 0.0
    metrics["optimizer_updates"] = updates_before + n_updates
    metrics["warnings"] = "; ".join(warnings)
    t3 = time.time()
    # full weights and optimizer state, gathered by every process (under FSDP each holds a shard)
    weights, opt_state = (None, None) if lora_rank else _full_state(scorer, opt)
    if acc.is_main_process:
        model_to_save = acc.unwrap_model(scorer).model
        if lora_rank:
            model_to_save = model_to_save.merge_and_unload()
        _save_checkpoint(out, model_to_save, weights, opt_state, policy, cfg, meta, initial, adv_rows, metrics,
                         samples_path, rewards_path, run_metrics, overwrite)
    acc.wait_for_everyone()
    metrics["save_s"] = round(time.time() - t3, 3)
    return {"stage": "rl-step", "out": str(out), "skipped": False, "step": metrics["step"],
            "seconds": round(time.time() - t0, 2), **{k: metrics[k] for k in
            ("loss", "kl", "reward_mean_coarse", "reward_mean_fine", "reward_mean_single", "kept_samples",
             "dropped_groups", "grad_norm") if k in metrics}}


def _full_state(scorer, opt) -> tuple[dict, dict]:
    """(policy weights, optimizer state) as full, CPU tensors keyed by parameter name, whatever
    wraps the scorer (none, DDP or FSDP): torch.distributed.checkpoint's state-dict API."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, opt_state = get_state_dict(scorer, getattr(opt, "optimizer", opt),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in weights.items()}, opt_state


def _load_optimizer_state(scorer, opt, state: dict) -> None:
    """The parent checkpoint's AdamW state into this run's (possibly wrapped) optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if all(isinstance(k, int) for k in state.get("state", {})):  # checkpoints before named keys
        opt.load_state_dict(state)
        return
    set_optimizer_state_dict(scorer, getattr(opt, "optimizer", opt), state,
                             options=StateDictOptions(full_state_dict=True))


def _broadcast_from_main(module: torch.nn.Module) -> None:
    """Process 0's weights and buffers into every process's copy of a module that no wrapper
    syncs (the frozen reference). Under an FSDP launch with cpu-RAM-efficient loading,
    transformers loads a model's weights on the main process only and leaves the others'
    uninitialised for FSDP to broadcast; the reference is never wrapped, so without this the
    other processes scored the KL against garbage (KL 4.0 on 2 GPUs at the first update)."""
    import torch.distributed as dist

    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


@contextlib.contextmanager
def _attention_without_cudnn():
    """SDPA without its cuDNN backend. On H100/H200 with torch >= 2.11, cuDNN attention's
    backward returns NaN gradients when the sequence length is 64 mod 128 and a query row is
    fully masked, which every left-padded row is (pytorch/pytorch#196678): a micro-batch of
    width 704 made every gradient NaN and the update was skipped. Which micro-batches hit such
    a width depends on how a minibatch is split, so one process and N processes skipped
    different updates. The memory-efficient and flash kernels are unaffected."""
    if not torch.cuda.is_available():
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield


def _sum_over_processes(acc, values: dict[str, float]) -> dict[str, float]:
    """Each process's diagnostics of its share of a minibatch, summed over processes (DDP); every
    process passes the same keys."""
    if acc.num_processes == 1:
        return values
    keys = sorted(values)
    total = acc.reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=acc.device), "sum")
    return dict(zip(keys, total.tolist()))


def _loss_mask(row: dict, pol) -> torch.Tensor:
    """Positions that carry a choice: reasoning tokens, the unforced <mesh-start> and mesh tokens."""
    kinds = pol.completion_kinds(torch.tensor([row["prompt_len"]]), torch.tensor([row["reasoning_end"]]),
                                 torch.tensor([row["mesh_end"]]), torch.tensor([len(row["input_ids"])]),
                                 torch.tensor([bool(row.get("reasoning_truncated", False))]),
                                 len(row["input_ids"]) - row["prompt_len"])[0]
    return (kinds == pol.KIND_REASONING) | (kinds == pol.KIND_MESH)


def _fit(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def _stack(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        n = min(len(r), width)
        out[i, :n] = r[:n]
    return out


def _with_lora(model, rank: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise InputError("--lora-rank needs peft: pip install 'rl3d[lora]'") from None
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, cfg)


def _metrics(samples, adv_rows, adv_stats, kept, sums, level_loss, grad_norms, n_updates, n_tokens,
             timings, meta, cfg, rewards) -> dict:
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
    for k in ("kl", "clip_low_frac", "clip_high_frac", "ratio_mean"):
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
    for lv in LEVEL_ORDER:
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
        import pyarrow.parquet as pq

        prev = pq.read_table(run_metrics).to_pylist()
        first = [r["value"] for r in prev if r["name"] == "entropy"]
        if first and m["entropy"] < 0.5 * first[0]:
            out.append(f"entropy collapsed: {m['entropy']:.3f} nats/token vs {first[0]:.3f} at the run's first step")
    return out


def _save_checkpoint(out: Path, model, weights, opt_state, policy, cfg, meta, initial, adv_rows, metrics,
                     samples_path, rewards_path, run_metrics, overwrite):
    """Everything lands in a temp dir renamed at the end: a killed rl-step leaves no checkpoint,
    and rerunning it reproduces the same parameters."""
    from rl3d.stages import policy as pol

    tmp = out.with_name(f".{out.name}.rl-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    extra = {"initial_policy": initial, "parent": str(Path(policy.path).resolve()), "rl_config": asdict(cfg)}
    extra["rl_step"] = metrics["step"]
    extra["optimizer_updates"] = metrics["optimizer_updates"]
    extra["sft_step"] = meta.get("sft_step", meta.get("step", 0) if "rl_step" not in meta else 0)
    pol.save_policy(tmp, model, policy.tokenizer, policy.codec, step=meta.get("step", 0),
                    base=meta.get("base"), codec_ref=None, extra=extra, state_dict=weights)
    if opt_state is not None:  # none for LoRA: the adapter is merged on save
        torch.save(opt_state, tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state()}, tmp / "rng_state.pt")
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
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    step = rows.column("step")[0].as_py()
    if path.exists():
        old = pq.read_table(path)
        old = old.filter(pc.not_equal(old.column("step"), step))
        rows = pa.concat_tables([old.select(rows.column_names).cast(rows.schema), rows])
    with shards_io.atomic_path(path) as tmp:
        pq.write_table(rows, tmp)
