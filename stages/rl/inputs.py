"""rl-step's input guard: everything about the samples, the rewards and the settings that would
otherwise crash deep in the update with a traceback, or train on garbage without a word, is refused
up front with one line naming the file and row. And the after-the-fact check that a step learned
something: a step that applied no update is reported loudly, never as a normal step."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.stages.policy.limits import model_limits
from rl3d.stages.rl.rl_config import RLConfig


MAX_TOTAL = 1e6  # a reward total beyond this is an overflow or a unit error, never a score


def check_step_inputs(policy_dir, samples_path, rewards_path, cfg: RLConfig) -> None:
    """Refuse before any model is loaded or any output touched (an --overwrite keeps the old output)."""
    cfg.check()
    if not Path(policy_dir).is_dir():
        raise InputError(f"policy dir {policy_dir} not found")
    limits = model_limits(policy_dir)
    samples = tables.read_table(samples_path, "samples")
    rewards = tables.read_table(rewards_path, "rewards")
    tables.require_rows(samples, str(samples_path), "samples")
    tables.require_unique(samples, ("sample_id",), str(samples_path))
    tables.require_unique(rewards, ("sample_id",), str(rewards_path))
    for n in suspect_rows(samples, limits.vocab_size, limits.max_positions):
        s = samples.slice(n, 1).to_pylist()[0]
        why = sample_problem(s, limits.vocab_size, limits.max_positions)
        if why:
            raise InputError(f"{samples_path}: row {n + 1} (sample {s['sample_id']!r}): {why}")
    for n, (sid, total, status) in enumerate(zip(*(rewards.column(c).to_pylist()
                                                   for c in ("sample_id", "total", "status"))), 1):
        if status == "ok" and (total is None or not math.isfinite(total)):
            raise InputError(f"{rewards_path}: row {n} (sample {sid!r}): status ok with total {total} "
                             f"(a failed reward needs a failure status)")
        if total is not None and not abs(total) <= MAX_TOTAL:  # group statistics of such totals overflow to NaN
            raise InputError(f"{rewards_path}: row {n} (sample {sid!r}): total {total} outside "
                             f"[-{MAX_TOTAL:g}, {MAX_TOTAL:g}]")


def suspect_rows(samples: pa.Table, vocab_size: int | None, max_positions: int | None) -> list[int]:
    """Indices of the rows sample_problem may refuse, in order: the same conditions column by column
    in pyarrow (a default step's 560k token ids and log-probs took ~0.3 s row by row in Python), so
    that only these rows are checked one by one for the message."""
    n = samples.num_rows
    ids, lps = samples.column("input_ids").combine_chunks(), samples.column("logprobs").combine_chunks()
    length = pc.fill_null(pc.list_value_length(ids), 0)
    plen = samples.column("prompt_len")
    ok = pc.fill_null(pc.equal(samples.column("status"), "ok"), False)
    bad = pc.invert(pc.and_(pc.greater(plen, 0), pc.less(plen, pc.add(length, pc.cast(pc.invert(ok), pa.int64())))))
    bad = pc.fill_null(bad, True)
    if max_positions is not None:
        bad = pc.or_(bad, pc.greater(length, max_positions))
    spans = [samples.column(k) for k in ("prompt_len", "reasoning_start", "reasoning_end", "mesh_start", "mesh_end")]
    disorder = pc.or_(pc.greater(spans[-1], length), pc.is_null(spans[-1]))
    for a, b in zip(spans, spans[1:]):
        disorder = pc.or_(disorder, pc.or_(pc.is_null(a), pc.greater(a, b)))
    n_lps = pc.fill_null(pc.list_value_length(lps), 0)
    disorder = pc.or_(disorder, pc.not_equal(n_lps, pc.subtract(length, plen)))
    bad = pc.or_(bad, pc.and_(ok, pc.fill_null(disorder, True)))
    rows = set(np.flatnonzero(np.asarray(bad.to_numpy(zero_copy_only=False), bool)).tolist()) if n else set()
    flat_ids = pc.list_flatten(ids)
    if vocab_size is not None and len(flat_ids):
        out = pc.or_(pc.less(flat_ids, 0), pc.greater_equal(flat_ids, vocab_size))
        rows |= _parents(ids, out)
    flat_lps = pc.list_flatten(lps)
    if len(flat_lps):
        rows |= _parents(lps, pc.invert(pc.fill_null(pc.is_finite(flat_lps), False)))
    return sorted(r for r in rows if 0 <= r < n)


def _parents(lists, flags) -> set[int]:
    """Rows of a list column holding a flagged value (flags: one per flattened value)."""
    hit = np.flatnonzero(np.asarray(pc.fill_null(flags, True).to_numpy(zero_copy_only=False), bool))
    return set(np.asarray(pc.list_parent_indices(lists))[hit].tolist()) if len(hit) else set()


def sample_problem(s: dict, vocab_size: int | None, max_positions: int | None) -> str | None:
    """Why a samples row cannot be trained on, or None."""
    ids = s["input_ids"] or []
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in ids):
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        return f"token id {bad} outside the policy's vocabulary [0, {vocab_size})"
    if max_positions is not None and len(ids) > max_positions:
        return f"{len(ids)} tokens, more than the policy's {max_positions} positions"
    if not 0 < s["prompt_len"] < len(ids) + (s["status"] != "ok"):
        return f"prompt_len {s['prompt_len']} does not fit input_ids of length {len(ids)}"
    spans = [s[k] for k in ("prompt_len", "reasoning_start", "reasoning_end", "mesh_start", "mesh_end")]
    if s["status"] == "ok" and (any(v is None for v in spans) or spans != sorted(spans) or spans[-1] > len(ids)):
        return f"spans {spans} (prompt_len, reasoning_start/end, mesh_start/end) out of order or past the sequence"
    lps = s["logprobs"] or []
    if s["status"] == "ok" and len(lps) != len(ids) - s["prompt_len"]:
        return f"{len(lps)} log-probs for {len(ids) - s['prompt_len']} completion tokens"
    if any(v is None or not math.isfinite(v) for v in lps):
        return "non-finite sampling log-prob (the ratio to it would be NaN)"
    return None


def learned_nothing(kept: list, n_updates: int, skipped_updates: int) -> str | None:
    """Why this step changed no weight, or None. Reported as a WARNING line and the metric
    learned_nothing = 1, so a run's charts and scripts can see it."""
    if not kept:
        return ("learned nothing: every group was dropped (no reward spread, failed rewards, or groups of one "
                "sample); the checkpoint equals its parent")
    if all(r.get("advantage", 0.0) == 0.0 for r in kept):
        return ("learned nothing: every kept advantage is 0 (groups of one sample, or no reward spread), so "
                "the policy-gradient term is zero")
    if n_updates == 0:
        return f"learned nothing: all {skipped_updates} update(s) had a non-finite gradient; the checkpoint equals its parent"
    return None
