"""Group-relative advantages with Hi-GRPO's back-flow (docs/hi_grpo.md, "Advantages").

Pure functions on plain arrays so they can be checked by hand:
    R~_high_i = R_high_i + lambda * R_low_i          (coarse rows; the refined result supervises the plan)
    A_i = (R_i - mean_group) / (std_group + eps)     (population std, per prompt group and level)

A sample the policy itself broke (gen status decode_error: every mesh token empty) has no reward.
By default its whole group is dropped; `failed_rewards="penalty"` scores it `failed_penalty` instead,
so the policy learns to stop producing it (the usual invalid-output reward of RL on LMs). Failures
that are not the policy's (render or reward backend errors) always drop the group or raise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rl3d.formats.errors import InputError
from rl3d.stages.rl.rl_config import check_modes

POLICY_FAILURES = ("decode_error",)  # sample statuses caused by the sampled tokens themselves


@dataclass
class AdvantageRow:
    sample_id: str
    prompt_id: str
    sample_index: int
    level: str
    reward: float          # the reward used for the advantage (coarse: with back-flow)
    advantage: float
    kept: bool
    reason: str = ""       # why a row was dropped


def compute_advantages(rows: list[dict], algo: str = "hi-grpo", lam: float = 1.0, adv_std: str = "group",
                       std_eps: float = 1e-4, dynamic_sampling: str = "off", min_std: float = 0.0,
                       failed_rewards: str = "drop-group", failed_penalty: float = 0.0,
                       train_levels: str = "all") -> tuple[list[AdvantageRow], dict]:
    """rows: dicts with sample_id, prompt_id, sample_index, level, total (None when failed), status.
    failed_rewards: drop-group | error | penalty (policy failures scored `failed_penalty`).
    train_levels: all, or the one level (coarse | fine) whose rows are kept; the other level's rows
    still shape the advantages (back-flow) but train nothing, not even their KL term.

    Returns one AdvantageRow per input row and counts of dropped groups and penalised rows.
    """
    check_modes(algo=algo, adv_std=adv_std, dynamic_sampling=dynamic_sampling, failed_rewards=failed_rewards,
                train_levels=train_levels)
    stats = {"groups": 0, "dropped_failed": 0, "dropped_no_spread": 0, "penalized_failed": 0}
    if train_levels != "all":
        stats["untrained_level_rows"] = 0
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    out: list[AdvantageRow] = []
    for pid, group in by_prompt.items():
        stats["groups"] += 1
        failed = [r for r in group if r.get("total") is None or not np.isfinite(r["total"])]
        penalized = set()
        if failed and failed_rewards == "penalty" and all(r.get("status") in POLICY_FAILURES for r in failed):
            penalized = {r["sample_id"] for r in failed}
            group = [dict(r, total=float(failed_penalty)) if r["sample_id"] in penalized else r for r in group]
            stats["penalized_failed"] += len(penalized)
            failed = []
        if failed:
            if failed_rewards == "error":
                r = failed[0]
                raise InputError(f"rewards: sample {r['sample_id']} has no reward ({r.get('status')}: "
                                 f"{r.get('message', '')}); use --failed-rewards drop-group to skip such groups")
            stats["dropped_failed"] += 1
            out += [_row(r, np.nan, 0.0, False, "failed reward in group") for r in group]
            continue
        adv = _group_advantages(group, algo, lam, adv_std, std_eps, dynamic_sampling, min_std, stats)
        for a in adv:
            if a.sample_id in penalized:
                a.reason = f"failed sample scored {failed_penalty:g} (--failed-rewards penalty)"
        out += adv
    if train_levels != "all":
        for a in out:
            if a.level != train_levels:
                a.kept, a.reason = False, f"level not trained (--train-levels {train_levels})"
                stats["untrained_level_rows"] += 1
    return out, stats


def _group_advantages(group, algo, lam, adv_std, std_eps, dynamic_sampling, min_std, stats):
    if algo == "hi-grpo":
        coarse = {r["sample_index"]: r for r in group if r["level"] == "coarse"}
        fine = {r["sample_index"]: r for r in group if r["level"] == "fine"}
        if set(coarse) != set(fine) or len(coarse) + len(fine) != len(group):
            pid = group[0]["prompt_id"]
            raise InputError(f"rewards: prompt {pid}: hi-grpo needs one coarse and one fine row per sample_index")
        idx = sorted(coarse)
        r_low = np.array([fine[i]["total"] for i in idx], np.float64)
        r_high = np.array([coarse[i]["total"] for i in idx], np.float64) + lam * r_low  # back-flow
        levels = [([coarse[i] for i in idx], r_high), ([fine[i] for i in idx], r_low)]
    else:
        if any(r["level"] != "single" for r in group):
            raise InputError(f"rewards: prompt {group[0]['prompt_id']}: grpo expects level 'single' rows "
                             f"(use --algo hi-grpo for coarse/fine samples)")
        group = sorted(group, key=lambda r: r["sample_index"])
        levels = [(group, np.array([r["total"] for r in group], np.float64))]
    out = []
    for level_rows, rewards in levels:
        std = rewards.std()  # population std, as in the paper
        no_spread = (dynamic_sampling == "zero-std" and std <= 1e-12) or \
                    (dynamic_sampling == "min-std" and std < min_std)
        if no_spread:
            stats["dropped_no_spread"] += 1
            out += [_row(r, rw, 0.0, False, "no reward spread") for r, rw in zip(level_rows, rewards)]
            continue
        centred = rewards - rewards.mean()
        adv = centred / (std + std_eps) if adv_std == "group" else centred
        out += [_row(r, rw, a, True) for r, rw, a in zip(level_rows, rewards, adv)]
    return out


def _row(r: dict, reward: float, adv: float, kept: bool, reason: str = "") -> AdvantageRow:
    return AdvantageRow(r["sample_id"], r["prompt_id"], int(r["sample_index"]), r["level"],
                        float(reward), float(adv), kept, reason)
