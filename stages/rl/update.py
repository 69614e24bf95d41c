"""The optimizer steps of one rl-step: epochs x minibatches, each minibatch's gradient summed over
micro-batches (exactly: the aggregation weights are computed on the whole minibatch first) and
over processes, clipped, and applied unless non-finite."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rl3d.stages.policy.sequence import KIND_MESH, KIND_PAD, KIND_REASONING, LEVELS, collate, completion_kinds
from rl3d.stages.rl import processes
from rl3d.stages.rl.rl_config import RLConfig
from rl3d.stages.rl.loss import diagnostics, logprob_mismatch, mismatch_metrics, policy_loss, token_weights, warmup_lr



@dataclass
class UpdateStats:
    """What the applied updates of a step add up to (skipped ones count only in skipped_updates)."""
    sums: dict[str, float] = field(default_factory=dict)  # loss.diagnostics(cfg) summed over updates
    level_loss: dict[str, float] = field(default_factory=lambda: {lv: 0.0 for lv in LEVELS})
    grad_norms: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    n_updates: int = 0
    n_tokens: int = 0
    skipped_updates: int = 0
    mismatch: dict[str, float] = field(default_factory=dict)  # mismatch_metrics of the first minibatch (stored)
    tis: dict[str, float] = field(default_factory=dict)  # truncated importance weights (recompute + tis_cap)


def logprobs(net, rows: list[dict], special, acc) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [B, T] of each row's completion under `net`, position kinds [B, T])."""
    b = collate(rows, special, device=acc.device, right_padded=True)
    with acc.autocast():
        lp, _ = net(b["input_ids"], b["attention_mask"], b["prompt_lens"], b["kinds"])
    return lp, b["kinds"]


def reference_logprobs(rows: list[dict], ref_scorer, special, acc, micro_batch: int,
                       length_buckets: bool = False) -> None:
    """Each row's completion log-probs under the frozen reference, into row["ref_logp"]."""
    score_rows(rows, ref_scorer, special, acc, micro_batch, "ref_logp", length_buckets)


def recompute_old_logprobs(rows: list[dict], scorer, special, acc, cfg: RLConfig) -> dict[str, float]:
    """--old-logprobs recompute: each row's completion log-probs under the current policy, before
    any update (no grad; verl's default), into row["old_logp"], the pi_old of the ratio. Returns
    the training/inference mismatch of every row against the log-probs gen stored. With
    cfg.tis_cap > 0 each row also gets row["tis"], its truncated importance weights."""
    score_rows(rows, scorer, special, acc, cfg.micro_batch, "old_logp", cfg.length_buckets)
    sums: dict[str, float] = {}
    for r, mask in zip(rows, row_masks(rows)):
        stored = torch.as_tensor(r["logprobs"], dtype=torch.float32)[:len(mask)]
        _add_mismatch(sums, logprob_mismatch(r["old_logp"][:len(mask)], stored, mask, cfg.clip_low, cfg.clip_high))
        if cfg.tis_cap > 0:
            r["tis"] = truncated_importance_weights(r["old_logp"][:len(mask)], stored, cfg.tis_cap)
    return mismatch_metrics(sums)


def truncated_importance_weights(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """min(pi_old / pi_behaviour, cap) per token: corrects samples drawn by another policy than the
    one the ratio starts from (a one-step-stale sampler, or a bf16 sampler beside an fp32 trainer),
    truncated so that one token cannot dominate (TIS, as verl and TRL apply it)."""
    return torch.exp((old_logp - behaviour_logp).clamp(max=20.0)).clamp(max=cap)


def tis_metrics(rows: list[dict], cap: float) -> dict[str, float]:
    """Mean truncated importance weight over the tokens that carry a choice, and the fraction cut at the cap."""
    total, clipped, n = 0.0, 0.0, 0
    weighted = [r for r in rows if "tis" in r]
    for r, mask in zip(weighted, row_masks(weighted)):
        w = r["tis"][mask[:len(r["tis"])]]
        total += float(w.sum())
        clipped += float((w >= cap).sum())
        n += int(w.numel())
    return {"tis_weight_mean": total / max(n, 1), "tis_clip_frac": clipped / max(n, 1)}


def score_rows(rows: list[dict], net, special, acc, micro_batch: int, key: str, length_buckets: bool = False) -> None:
    """No-grad completion log-probs of every row under `net`, micro_batch rows per forward (in
    length order with `length_buckets`: less padding), into row[key] as float32 [completion length].
    The head and log-softmax run in chunks of positions (completion_logprobs): no [B, T, V] logits."""
    order = by_length(rows, range(len(rows))) if length_buckets else list(range(len(rows)))
    with torch.no_grad():
        for i in range(0, len(order), micro_batch):
            chunk = [rows[j] for j in order[i:i + micro_batch]]
            lp, kinds = logprobs(net, chunk, special, acc)
            for r, row_lp, n in zip(chunk, lp.float().cpu(), (kinds != KIND_PAD).sum(1).tolist()):
                r[key] = row_lp[:n]


def by_length(rows: list[dict], idx) -> list[int]:
    """`idx` sorted by sequence length (then prompt length): micro-batches cut from it hold rows of
    similar width, so collate pads little. Stable, so equal lengths keep their order."""
    return sorted(idx, key=lambda i: (len(rows[i]["input_ids"]), int(rows[i]["prompt_len"])))


def run_updates(rows: list[dict], scorer, opt, acc, special, cfg: RLConfig, with_reference: bool,
                updates_before: int) -> UpdateStats:
    """cfg.epochs passes over `rows` in minibatches of cfg.minibatch (shuffled by cfg.seed when
    there is more than one minibatch or epoch), one optimizer update per minibatch."""
    stats = UpdateStats()
    first = cfg.old_logprobs == "stored"  # measure the mismatch on the first minibatch, before its update
    gen = torch.Generator().manual_seed(cfg.seed)
    mb_size = cfg.minibatch or len(rows)
    for _ in range(cfg.epochs if rows else 0):
        order = torch.randperm(len(rows), generator=gen).tolist() if cfg.epochs > 1 or cfg.minibatch else list(range(len(rows)))
        for s in range(0, len(order), mb_size):
            mb = [rows[i] for i in order[s:s + mb_size]]
            weights, n_tokens = minibatch_weights(mb, cfg.loss_agg)
            mismatch: dict[str, float] | None = {} if first else None
            mb_sums, mb_level_loss = accumulate_gradients(mb, weights, scorer, acc, special, cfg, with_reference,
                                                          mismatch)
            if first:
                stats.mismatch, first = mismatch_metrics(processes.mismatch_over_processes(acc, mismatch)), False
            norm = float(acc.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm))
            if not math.isfinite(norm):  # never apply a non-finite update; count it instead
                stats.skipped_updates += 1
                opt.zero_grad(set_to_none=True)
                continue
            for k, v in mb_sums.items():
                stats.sums[k] = stats.sums.get(k, 0.0) + v
            for lv, v in mb_level_loss.items():
                stats.level_loss[lv] += v
            stats.grad_norms.append(norm)
            stats.lrs.append(warmup_lr(cfg.lr, updates_before + stats.n_updates, cfg.warmup_updates))
            for group in opt.param_groups:
                group["lr"] = stats.lrs[-1]
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats.n_updates += 1
            stats.n_tokens += n_tokens
    return stats


def minibatch_weights(mb: list[dict], loss_agg: str) -> tuple[torch.Tensor, int]:
    """(aggregation weights [rows, width] of the whole minibatch, tokens that carry a choice): the
    rows' loss_mask, computed for all rows at once (one row at a time cost ~0.3 ms a row)."""
    mask = loss_masks(mb)
    levels = torch.tensor([LEVELS.index(r["level"]) for r in mb])
    return token_weights(mask, levels, loss_agg), int(mask.sum())


def loss_masks(rows: list[dict]) -> torch.Tensor:
    """bool[rows, longest completion]: each row's loss_mask, padded with False."""
    def column(key, default=None):
        return torch.tensor([int(r[key]) if default is None else bool(r.get(key, default)) for r in rows])
    plen, lens = column("prompt_len"), torch.tensor([len(r["input_ids"]) for r in rows])
    kinds = completion_kinds(plen, column("reasoning_end"), column("mesh_end"), lens,
                             column("reasoning_truncated", False), int((lens - plen).max()))
    return (kinds == KIND_REASONING) | (kinds == KIND_MESH)


def accumulate_gradients(mb: list[dict], weights_all: torch.Tensor, scorer, acc, special, cfg: RLConfig,
                         with_reference: bool, mismatch: dict[str, float] | None = None
                         ) -> tuple[dict[str, float], dict[str, float]]:
    """Backward over this process's micro-batches of a minibatch; returns the minibatch's
    diagnostics and per-level loss, summed over processes. `mismatch` (a dict): this process's
    logprob_mismatch sums of its rows are added to it (the forward precedes the update).
    With cfg.length_buckets the rows are cut into micro-batches in length order; the weights are
    the whole minibatch's either way, so the gradient is the same sum in another order."""
    mine = processes.my_rows(len(mb), acc)
    if cfg.length_buckets:
        mine = by_length(mb, mine)
    mb_sums = dict.fromkeys(diagnostics(cfg), 0.0)
    mb_level_loss = {lv: 0.0 for lv in LEVELS}
    for m in range(processes.micro_batch_count(len(mb), cfg.micro_batch, acc)):
        idx = mine[m * cfg.micro_batch:(m + 1) * cfg.micro_batch] or mine[:1] or [0]
        dummy = not mine[m * cfg.micro_batch:(m + 1) * cfg.micro_batch]  # pairs another process's backward
        rows = [mb[i] for i in idx]
        lp, kinds = logprobs(scorer, rows, special, acc)
        T = lp.shape[1]
        w = _fit(weights_all[idx], T).to(lp.device) * (0.0 if dummy else float(acc.num_processes))
        stored = _stack([torch.as_tensor(r["logprobs"], dtype=torch.float32) for r in rows], T).to(lp.device)
        old = (_stack([r["old_logp"] for r in rows], T).to(lp.device) if cfg.old_logprobs == "recompute"
               else stored)
        if mismatch is not None and not dummy:
            chosen = (kinds == KIND_REASONING) | (kinds == KIND_MESH)
            _add_mismatch(mismatch, logprob_mismatch(lp, stored, chosen, cfg.clip_low, cfg.clip_high))
        ref = _stack([r["ref_logp"] for r in rows], T).to(lp.device) if with_reference else old
        adv = torch.tensor([r["advantage"] for r in rows], dtype=torch.float32, device=lp.device)
        tis = _stack([r["tis"] for r in rows], T).to(lp.device) if cfg.tis_cap > 0 and \
            cfg.old_logprobs == "recompute" else None
        loss, parts = policy_loss(lp, old, ref, adv, w, cfg, tis)
        acc.backward(loss)
        if not dummy:
            frac = float(w.sum()) / max(float(weights_all.sum()), 1e-12) / acc.num_processes
            for k, v in parts.items():
                if k != "row_loss":
                    # this process's share; w carries x num_processes for DDP's gradient mean
                    mb_sums[k] += v / acc.num_processes if k == "pg" else v * frac
            for r, rl in zip(rows, parts["row_loss"].tolist()):
                mb_level_loss[r["level"]] += rl / acc.num_processes
    return processes.sum_over_processes(acc, mb_sums), processes.sum_over_processes(acc, mb_level_loss)


def _add_mismatch(total: dict[str, float], part: dict[str, float]) -> None:
    for k, v in part.items():
        total[k] = max(total.get(k, 0.0), v) if k == "abs_max" else total.get(k, 0.0) + v


def row_masks(rows: list[dict]) -> list[torch.Tensor]:
    """Each row's loss_mask, as long as its completion, computed for all rows at once."""
    if not rows:
        return []
    masks = loss_masks(rows)
    return [m[:len(r["input_ids"]) - int(r["prompt_len"])] for r, m in zip(rows, masks)]


def loss_mask(row: dict) -> torch.Tensor:
    """Positions that carry a choice: reasoning tokens, the unforced <mesh-start> and mesh tokens."""
    return loss_masks([row])[0]


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
