"""sft's training loop under accelerate (CPU, one GPU, `accelerate launch` for several): data and
model, the schedule, resume from the latest checkpoint, optimizer steps with gradient accumulation,
eval loss, checkpoints every --save-every steps and the exported final policy."""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import get_cosine_schedule_with_warmup
from transformers.utils import logging as hf_logging

from rl3d.formats.shards import atomic_write_json
from rl3d.stages.contract import Progress
from rl3d.stages.policy.checkpoint import freeze_vision, prompt_format_for
from rl3d.stages.policy.tokenizer import special_ids
from rl3d.stages.supervised.checkpoints import (RUN_CONFIG, check_run_config, clear_outputs, export_policy,
                                                latest_checkpoint, policy_meta, restore_trainer_state, save_checkpoint)
from rl3d.stages.supervised.data import Packed, build_datasets, collate_packed, read_sft_rows, step_indices
from rl3d.stages.supervised.metrics import Metrics, last_train_loss
from rl3d.stages.supervised.model import (build_optimizer, completion_loss, inherited_prompt_meta, initial_model,
                                          mesh_id_table, policy_codec, set_special_ids)
from rl3d.stages.supervised.options import SFTOptions


def train(opts: SFTOptions, out: Path, overwrite: bool, progress: Progress) -> dict:
    """Train into the run folder `out` (resuming from its latest checkpoint; with overwrite, from
    scratch) up to its final policy; return the summary's fields."""
    hf_logging.disable_progress_bar()  # save_pretrained's shard bar would interleave with ours
    acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    main = acc.is_main_process
    if overwrite and main:
        clear_outputs(out)
    acc.wait_for_everyone()
    key = opts.trajectory_key()
    check_run_config(out, key)

    # data and model
    codec = policy_codec(opts)
    rows = read_sft_rows(opts.data, opts.mode)
    set_seed(opts.seed)
    resume = latest_checkpoint(out)
    model, tokenizer = initial_model(opts, rows, codec, resume)
    freeze_vision(model)  # a vision-language policy trains its text side only
    set_special_ids(model, tokenizer)
    special = special_ids(tokenizer, codec)
    prompt_meta = inherited_prompt_meta(opts, resume)
    fmt = prompt_format_for(prompt_meta, tokenizer)
    with _timed(progress, "sft: preparing sequences"):
        train, evals, excluded, too_long = build_datasets(rows, opts, tokenizer, special, codec,
                                                          model.config.get_text_config().max_position_embeddings, fmt)

    # schedule, optimizer, resume
    per_step = opts.batch_size * opts.grad_accum * acc.num_processes
    total = opts.steps if opts.steps is not None else max(1, math.ceil((opts.epochs or 1.0) * len(train) / per_step))
    eval_every = opts.eval_every or max(1, total // 10)
    save_every = opts.save_every or max(1, total // 5)
    optimizer = build_optimizer(model, opts)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(round(opts.warmup * total)), total)
    start, last_eval = 0, {}
    if resume is not None:
        start, last_eval = restore_trainer_state(resume, optimizer, scheduler)
        progress.log(f"sft: resuming from {resume} (step {start})")
    model, optimizer = acc.prepare(model, optimizer)  # the scheduler is stepped by hand, once per step
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / RUN_CONFIG, key)
    metrics = Metrics(out, main, start)
    n_params = sum(p.numel() for p in acc.unwrap_model(model).parameters())
    if start == 0:
        progress.log(f"sft: {n_params / 1e6:.2f}M parameters, {len(train)} train / {len(evals)} eval sequences, "
                     f"{total} steps of {per_step} sequences")
    is_mesh = mesh_id_table(special, acc.device)
    pad_id = tokenizer.pad_token_id
    base = str(opts.init) if opts.init else None

    # the training loop
    model.train()
    window = np.zeros(5)  # loss sums since the last log line (see completion_loss)
    t_log, tokens_log = time.time(), 0
    for step in progress.track(range(start, total), total=total - start, desc="sft"):
        batches = step_batches(train, step, per_step, opts, acc, pad_id)
        n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for i, b in enumerate(batches):  # gradient accumulation: sync only on the last micro-batch
            b = {k: v.to(acc.device) for k, v in b.items()}
            ctx = acc.no_sync(model) if i < len(batches) - 1 else contextlib.nullcontext()
            with ctx:
                loss_sum, stats = completion_loss(model, b, is_mesh)
                acc.backward(loss_sum / n_tok)
            window += stats.cpu().numpy()
            tokens_log += int(b["attention_mask"].sum())
        grad_norm = acc.clip_grad_norm_(model.parameters(), opts.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % opts.log_every == 0 or done == total:
            seconds = max(time.time() - t_log, 1e-9)
            metrics.log(done, train_record(window, scheduler, grad_norm, tokens_log * acc.num_processes / seconds,
                                           done * per_step / len(train)))
            window[:] = 0
            t_log, tokens_log = time.time(), 0
        if (done % eval_every == 0 or done == total) and len(evals):
            last_eval = evaluate(model, evals, acc, opts.batch_size, pad_id, is_mesh)
            metrics.log(done, last_eval)
            progress.log(f"sft: step {done}/{total} eval_loss {last_eval['eval_loss']:.4f} "
                         f"mesh_acc {last_eval['eval_mesh_acc']:.3f}")
        if done % save_every == 0 or done == total:
            acc.wait_for_everyone()
            if main:
                save_checkpoint(out, done, acc.unwrap_model(model), tokenizer, codec, optimizer, scheduler,
                                opts.keep_checkpoints, base,
                                {**prompt_meta, **policy_meta(opts.mode, tokenizer, codec, "float32")}, last_eval)
                metrics.write_parquet(key)
            acc.wait_for_everyone()

    # the final policy
    if main:
        extra = {**prompt_meta, "sft": key, "params": n_params, "train_sequences": len(train), "eval": last_eval}
        export_policy(out, acc.unwrap_model(model), tokenizer, codec, total, opts.mode, opts.save_dtype, base, extra)
        metrics.write_parquet(key)
    acc.wait_for_everyone()
    return {"final": str(out / "final"), "steps": total, "resumed_from": start,
            "train_sequences": len(train), "eval_sequences": len(evals), "excluded_rows": excluded,
            "too_long": too_long, "params": n_params, "train_loss": last_train_loss(out / "metrics.jsonl"),
            **last_eval}


def step_batches(train: Packed, step: int, per_step: int, opts: SFTOptions, acc, pad_id: int) -> list[dict]:
    """This process's micro-batches of one optimizer step (CPU tensors)."""
    idx = step_indices(step, len(train), per_step, opts.seed)
    mine = idx[acc.process_index::acc.num_processes]
    return [collate_packed(train, mine[i:i + opts.batch_size], pad_id) for i in range(0, len(mine), opts.batch_size)]


def train_record(window: np.ndarray, scheduler, grad_norm, tokens_per_s: float, epoch: float) -> dict:
    """One metrics.jsonl record from the loss sums since the last one."""
    return {"loss": window[0] / max(window[1], 1), "mesh_loss": window[2] / max(window[3], 1),
            "mesh_acc": window[4] / max(window[3], 1), "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s, "epoch": epoch}


def evaluate(model, evals: Packed, acc, batch_size: int, pad_id: int, is_mesh: torch.Tensor) -> dict:
    """Loss, mesh loss and mesh-token accuracy on the eval sequences, over all processes."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=acc.device)
    mine = np.arange(acc.process_index, len(evals), acc.num_processes)
    with torch.no_grad():
        for s in range(0, len(mine), batch_size):
            batch = {k: v.to(acc.device) for k, v in collate_packed(evals, mine[s:s + batch_size], pad_id).items()}
            sums += completion_loss(model, batch, is_mesh)[1]
    sums = acc.reduce(sums, "sum").cpu().numpy()
    model.train()
    return {"eval_loss": sums[0] / max(sums[1], 1), "eval_mesh_loss": sums[2] / max(sums[3], 1),
            "eval_mesh_acc": sums[4] / max(sums[3], 1)}


@contextlib.contextmanager
def _timed(progress: Progress, what: str):
    t = time.time()
    yield
    progress.log(f"{what}: {time.time() - t:.1f}s")
