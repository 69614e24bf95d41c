"""The bookkeeping of a multi-process launch (DDP or FSDP through accelerate), in one place: which
rows of a minibatch each process takes, the step's diagnostics summed over processes, the full
weights and optimizer state gathered, the frozen reference made the same on every process.
With one process each of these is the identity."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, get_state_dict,
                                                     set_optimizer_state_dict)


def my_rows(n_rows: int, acc) -> list[int]:
    """The rows of an n-row minibatch this process takes: every N-th, from its index."""
    return list(range(acc.process_index, n_rows, acc.num_processes))


def micro_batch_count(n_rows: int, micro_batch: int, acc) -> int:
    """Micro-batches every process runs for an n-row minibatch: as many as the process with the
    most rows needs (a process with fewer runs empty ones, so the gradient all-reduces pair up)."""
    return math.ceil(math.ceil(n_rows / acc.num_processes) / micro_batch)


def min_over_processes(acc, value: int) -> int:
    """The smallest of every process's value (the same on all of them afterwards)."""
    if acc.num_processes == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=acc.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def sum_over_processes(acc, values: dict[str, float]) -> dict[str, float]:
    """Each process's diagnostics of its share of a minibatch, summed over processes (DDP); every
    process passes the same keys."""
    if acc.num_processes == 1:
        return values
    keys = sorted(values)
    total = acc.reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=acc.device), "sum")
    return dict(zip(keys, total.tolist()))


def mismatch_over_processes(acc, sums: dict[str, float]) -> dict[str, float]:
    """logprob_mismatch sums of each process's rows combined: summed, except the max."""
    if acc.num_processes == 1:
        return sums
    keys = ("abs_sum", "out_of_clip", "tokens")
    total = sum_over_processes(acc, {k: sums.get(k, 0.0) for k in keys})
    top = torch.tensor([sums.get("abs_max", 0.0)], dtype=torch.float64, device=acc.device)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return {**total, "abs_max": float(top[0])}


def broadcast_from_main(module: torch.nn.Module) -> None:
    """Process 0's weights and buffers into every process's copy of a module that no wrapper
    syncs (the frozen reference). Under an FSDP launch with cpu-RAM-efficient loading,
    transformers loads a model's weights on the main process only and leaves the others'
    uninitialised for FSDP to broadcast; the reference is never wrapped, so without this the
    other processes scored the KL against garbage (KL 4.0 on 2 GPUs at the first update)."""
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


def full_state(scorer, opt) -> tuple[dict, dict]:
    """(policy weights, optimizer state) as full, CPU tensors keyed by parameter name, whatever
    wraps the scorer (none, DDP or FSDP): torch.distributed.checkpoint's state-dict API."""
    weights, opt_state = get_state_dict(scorer, getattr(opt, "optimizer", opt),
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in weights.items()}, opt_state


def optimizer_state(scorer, opt) -> dict:
    """full_state's optimizer half alone (a LoRA run's checkpoint: the base weights are not saved)."""
    return get_optimizer_state_dict(scorer, getattr(opt, "optimizer", opt),
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(scorer, opt, state: dict) -> None:
    """The parent checkpoint's AdamW state into this run's (possibly wrapped) optimizer."""
    if all(isinstance(k, int) for k in state.get("state", {})):  # checkpoints before named keys
        opt.load_state_dict(state)
        return
    set_optimizer_state_dict(scorer, getattr(opt, "optimizer", opt), state,
                             options=StateDictOptions(full_state_dict=True))
