"""sft's run folder: OUT/checkpoints/step-NNNNNN (a policy dir written by save_policy plus
trainer_state.pt) to resume from, OUT/final (the exported policy, its rl3d_policy.json last: the run is
done), OUT/sft_config.json (the trajectory options a resume must match)."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from rl3d.formats.errors import InputError
from rl3d.formats.shards import pid_alive
from rl3d.stages.policy.checkpoint import load_trainer_state, restore_rng, rng_state, save_policy
from rl3d.stages.policy.sequence import MODE_LEVELS
from rl3d.stages.policy.tokenizer import mesh_token_offset

STATE_FILE = "trainer_state.pt"
RUN_CONFIG = "sft_config.json"
OUTPUTS = ("checkpoints", "final", "tensorboard", "metrics.jsonl", "metrics.parquet", RUN_CONFIG)


def clear_outputs(out: Path) -> None:
    """--overwrite: remove what an earlier run wrote into OUT (nothing else)."""
    for name in OUTPUTS:
        p = out / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def check_run_config(out: Path, key: dict) -> None:
    """Refuse to resume or skip a run in OUT made with other trajectory options than `key`."""
    cfg_file = out / RUN_CONFIG
    if not cfg_file.is_file():
        return
    before = json.loads(cfg_file.read_text())
    diff = sorted(k for k in set(before) | set(key) if before.get(k) != key.get(k))
    if diff:
        raise InputError(f"{cfg_file}: this run differs from the one in {out} in {', '.join(diff)} "
                         f"(use --overwrite to start over, or another --out)")


def latest_checkpoint(out: Path) -> Path | None:
    # step-N.tmp is a save a kill interrupted: never resume from it
    ckpts = sorted(p for p in (out / "checkpoints").glob("step-*")
                   if not p.name.endswith(".tmp") and (p / STATE_FILE).is_file())
    return ckpts[-1] if ckpts else None


def save_checkpoint(out: Path, step: int, model, tokenizer, codec, optimizer, scheduler, keep: int,
                    base: str | None, meta: dict, last_eval: dict | None = None) -> Path:
    """OUT/checkpoints/step-NNNNNN: a policy dir (written by save_policy, so load_policy and gen
    read it too) plus trainer_state.pt, the optimizer, scheduler, RNG, data cursor and the last eval
    numbers (a resumed run exports them in final/ as an uninterrupted one does)."""
    final = out / "checkpoints" / f"step-{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(tmp, model, tokenizer, codec, step=step, base=base, codec_ref=None, extra=meta)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "last_eval": {k: float(v) for k, v in (last_eval or {}).items()}}
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # atomic: a checkpoint dir with trainer_state.pt is complete
    for old in sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def restore_trainer_state(checkpoint: Path, optimizer, scheduler) -> tuple[int, dict]:
    """Optimizer, scheduler and RNG state of a checkpoint; returns its step (the data cursor) and
    the last eval numbers before it ({} from checkpoints written before they were kept)."""
    state = load_trainer_state(checkpoint / STATE_FILE)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    return int(state["step"]), dict(state.get("last_eval") or {})


def policy_meta(mode: str, tokenizer, codec, dtype: str) -> dict:
    """What sft records in rl3d_policy.json besides save_policy's own keys."""
    return {"mode": mode, "levels": list(MODE_LEVELS[mode]), "mesh_token_offset": mesh_token_offset(tokenizer),
            "mesh_vocab_size": codec.vocab_size, "mesh_seq_len": codec.seq_len, "dtype": dtype}


def export_policy(out: Path, model, tokenizer, codec, step: int, mode: str, save_dtype: str, base: str | None,
                  extra: dict) -> Path:
    """OUT/final: a self-contained policy dir (weights, tokenizer, generation config, a copy of the
    codec, rl3d_policy.json) written by save_policy, the format load_policy reads."""
    m = copy.deepcopy(model).to(getattr(torch, save_dtype))  # loaders cast to their compute dtype
    meta = {**policy_meta(mode, tokenizer, codec, save_dtype), **extra}
    remove_stale_exports(out)
    return save_policy(out / "final", m, tokenizer, codec, step=step, base=base, codec_ref=None, extra=meta)


def remove_stale_exports(out: Path) -> list[Path]:
    """Remove `.final.tmp-PID/` dirs that a killed export left (save_policy's temp dir): one sft
    process writes final/, so a temp of a process no longer alive on this host is stale."""
    stale = [d for d in out.glob(".final.tmp-*")
             if d.name.rpartition("-")[2].isdigit() and not pid_alive(int(d.name.rpartition("-")[2]))]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale
