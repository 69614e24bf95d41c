"""A training run's directory: its settings record (train.json), its checkpoints and the ids of the
policies it holds only in memory.

RUN/train.json                        the settings the run was started with (a resume must match)
RUN/checkpoints/step-NNNNNN/          a complete policy dir (weights, tokenizer, codec,
                                      rl3d_policy.json) + optimizer.pt + rng_state.pt + train_state.json
RUN/step-NNNNNN/{prompts,gen,renders,rewards,update}   the stage outputs of each step
RUN/metrics.parquet                   one row per (step, metric), as rl-step writes it
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from rl3d.formats import shards as shards_io
from rl3d.formats.errors import InputError
from rl3d.stages.policy.checkpoint import (carried_meta, load_plain_state, restore_rng, rng_state, save_policy,
                                          sft_step_of)
from rl3d.stages.rl.learner import ADAPTER_DIR, save_adapter

SETTINGS_FILE = "train.json"
CHECKPOINTS = "checkpoints"
STATE_FILE = "train_state.json"  # written last into a checkpoint: its completion marker


def step_dir(run: Path, step: int) -> Path:
    return Path(run) / f"step-{step:06d}"


def checkpoint_dir(run: Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step:06d}"


def resident_policy_id(run: Path, initial_id: str, settings_hash: str, step: int) -> str:
    """The id of the run's policy after `step` updates, which exists in memory only: the same for a
    resumed run (a function of the initial weights, the settings and the step), another for any
    other run, and the same after the run folder moves (the name part is relative to it). Step 0 is
    the initial policy's own id."""
    if step == 0:
        return initial_id
    digest = hashlib.sha256(f"{initial_id.split('@', 1)[-1]}|{settings_hash}|{step}".encode()).hexdigest()[:12]
    return f"{CHECKPOINTS}/step-{step:06d}@{digest}#step{step}"


def record_settings(run: Path, settings: dict, allow_changes: bool, write: bool = True) -> None:
    """Write RUN/train.json on the first start; on a resume refuse other settings (exit 2) unless
    `allow_changes`, which records the new ones beside the old (train.json keeps every start's).
    `write` False: only the check."""
    path = Path(run) / SETTINGS_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON ({e.msg})") from None
        current = old.get("settings", {})
        changed = sorted(k for k in set(current) | set(settings)
                         if k not in RESUMABLE and current.get(k) != settings.get(k))
        if changed and not allow_changes:
            shown = ", ".join(_change(k, current, settings) for k in changed[:4])
            raise InputError(f"{path}: the run was started with other settings ({shown}); "
                             f"resume with the same ones, or pass --allow-changes")
        if not write:
            return
        if changed or any(current.get(k) != settings.get(k) for k in RESUMABLE):
            old.setdefault("changes", []).append({"from": {k: current.get(k) for k in settings},
                                                  "to": settings})
            old["settings"] = settings
            shards_io.atomic_write_json(path, old)
        return
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        shards_io.atomic_write_json(path, {"settings": settings})


def _change(key: str, before: dict, after: dict) -> str:
    """One changed setting for a person; of a group of settings (the update's), only the ones that
    differ. A setting recorded only when not at its default (TrainOptions.settings) shows as "(default)"."""
    old, new = before.get(key), after.get(key)
    if isinstance(old, dict) and isinstance(new, dict):
        return ", ".join(f"{key}.{k}: {_shown(old, k)} -> {_shown(new, k)}"
                         for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
    return f"{key}: {_shown(before, key)} -> {_shown(after, key)}"


def _shown(settings: dict, key: str) -> str:
    return repr(settings[key]) if key in settings else "(default)"


# settings a resume may change without --allow-changes: where the run folder is, how long to run
# and how to report, not what the steps compute
RESUMABLE = ("out", "gen_batch_size", "steps", "quiet", "tensorboard", "eval_every", "eval_bench", "eval_limit", "keep_checkpoints",
             "save_every", "profile_step", "time_limit")


def latest_checkpoint(run: Path) -> tuple[int, Path] | None:
    """(step, dir) of the newest complete checkpoint, or None."""
    d = Path(run) / CHECKPOINTS
    best = None
    for c in d.glob("step-*") if d.is_dir() else []:
        if (c / STATE_FILE).is_file() and c.name[5:].isdigit():
            s = int(c.name[5:])
            best = max(best, (s, c)) if best else (s, c)
    return best


def save_checkpoint(run: Path, step: int, model, weights, opt_state, policy, meta: dict, initial: str,
                    state: dict, keep: int = 0, protect=None, adapter=None) -> Path:
    """The policy after `step` updates as a complete policy dir (loadable by every command) with the
    optimizer and RNG states and the loop's state, written beside and renamed into place. `keep`:
    how many of the newest to keep (0 = all); `protect(step)` True keeps one regardless (a held-out
    evaluation may be reading it). A LoRA run: `adapter` = (peft model, adapter weights), written to
    adapter/ with the adapter's optimizer state; the complete (merged) policy dir only where
    `weights` are given (a held-out evaluation's step, the run's last)."""
    final = checkpoint_dir(run, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter is None or weights is not None:
        extra = {**carried_meta(meta), "initial_policy": initial, "rl_step": step,
                 "optimizer_updates": state["optimizer_updates"], "policy_id": state["policy_id"],
                 "sft_step": sft_step_of(meta)}
        save_policy(tmp, model, policy.tokenizer, policy.codec, step=step, base=meta.get("base"),
                    extra=extra, state_dict=weights)
    else:
        tmp.mkdir(parents=True)
    if adapter is not None:
        save_adapter(*adapter, tmp / ADAPTER_DIR)
    if opt_state is not None:
        torch.save(opt_state, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng_state.pt")
    shards_io.atomic_write_json(tmp / STATE_FILE, state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        done = sorted(c for c in final.parent.glob("step-*") if (c / STATE_FILE).is_file())
        for old in done[:-keep]:
            if protect is None or not protect(int(old.name[5:])):
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(ckpt: Path) -> dict:
    """A checkpoint's loop state, and its RNG states restored."""
    state = json.loads((Path(ckpt) / STATE_FILE).read_text())
    rng = Path(ckpt) / "rng_state.pt"
    if rng.is_file():
        restore_rng(load_plain_state(rng, "RNG state"))
    return state
