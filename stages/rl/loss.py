"""The Hi-GRPO loss (docs/rl.md):  L_k = -(1/sum_i |y_k,i|) sum_i sum_t [min(r A, clip(r) A) - beta KL3],
per level, summed over levels; the aggregation weights; the LR warm-up."""
from __future__ import annotations

import torch

from rl3d.stages.rl.rl_config import RLConfig

# what policy_loss reports of each micro-batch besides its rows' losses
DIAGNOSTICS = ("pg", "kl", "clip_low_frac", "clip_high_frac", "ratio_mean")


def diagnostics(cfg: RLConfig) -> tuple[str, ...]:
    """The diagnostics measured under cfg: without a reference (beta 0) there is no KL to report,
    and none is reported rather than a 0 that reads as measured."""
    return DIAGNOSTICS if cfg.beta > 0 else tuple(k for k in DIAGNOSTICS if k != "kl")


def policy_loss(logp, old_logp, ref_logp, adv, weights, cfg: RLConfig, tis=None):
    """Per-token objective summed with `weights` (which encode the aggregation and 1/|y|).

    logp, old_logp, ref_logp, weights: [B, T] (weights 0 on padding and forced tokens); adv: [B];
    tis: None or [B, T] truncated importance weights pi_old / pi_behaviour (detached) that scale the
    policy-gradient term of stale samples (the KL term is the current policy's own).
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
    if tis is not None:
        pg = pg * tis
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
        sums = {
            "pg": -(pg * weights).sum(),
            "kl": (kl * w).sum(),
            "clip_low_frac": (((ratio < 1 - cfg.clip_low) & (a < 0)).float() * w).sum(),
            "clip_high_frac": (((ratio > 1 + cfg.clip_high) & (a > 0)).float() * w).sum(),
            "ratio_mean": (ratio * w).sum(),
        }
        parts = {k: float(sums[k]) for k in diagnostics(cfg)}
        parts["row_loss"] = per_row.detach()
    return loss, parts


def logprob_mismatch(train_logp: torch.Tensor, gen_logp: torch.Tensor, mask: torch.Tensor, clip_low: float,
                     clip_high: float) -> dict[str, float]:
    """Sums behind the training/inference mismatch metrics over the `mask`ed tokens: |logp_train -
    logp_gen| summed and its max, the tokens whose first-update ratio exp(logp_train - logp_gen)
    leaves [1 - clip_low, 1 + clip_high], and the token count. Sums, so micro-batches and
    processes add up (mismatch_metrics turns them into means)."""
    diff = (train_logp.detach().float() - gen_logp.float()).masked_fill(~mask, 0.0)
    ratio = torch.exp(diff.clamp(max=20.0))
    out = ((ratio < 1 - clip_low) | (ratio > 1 + clip_high)) & mask
    return {"abs_sum": float(diff.abs().sum()), "abs_max": float(diff.abs().max()) if diff.numel() else 0.0,
            "out_of_clip": float(out.sum()), "tokens": float(mask.sum())}


def mismatch_metrics(sums: dict[str, float]) -> dict[str, float]:
    """The step's mismatch metrics (docs/rl.md) from logprob_mismatch's sums."""
    n = max(sums.get("tokens", 0.0), 1.0)
    return {"mismatch_abs_mean": sums.get("abs_sum", 0.0) / n, "mismatch_abs_max": sums.get("abs_max", 0.0),
            "mismatch_clip_frac": sums.get("out_of_clip", 0.0) / n, "mismatch_tokens": sums.get("tokens", 0.0)}


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
