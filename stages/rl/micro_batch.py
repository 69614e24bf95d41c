"""How many sequences one forward pass of the update takes when --micro-batch is "auto".

Micro-batching is gradient accumulation over weights fixed for the whole minibatch, so the update
is the same for any size (up to float summation order); only speed and memory depend on it. On a
GPU the embedded default's update is launch-bound at 8 rows: an H100 took 9.0 s a step of 1,024
sequences at 8 and 2.8 s at 128 (same machine). On a CPU larger micro-batches were slower (the
demo's update: 65 / 75 / 86 s at 8 / 32 / 64), so "auto" there is CPU_ROWS.

On a GPU, "auto" takes the largest power of two (at most MAX_ROWS) whose activations, estimated
from the model's shape and the batch's longest sequence, fill at most MEMORY_SHARE of the device
memory that the weights, gradients and optimizer state leave. A deterministic estimate from the
card's total memory, not its free memory: the same card and batch always give the same size.

`--gradient-checkpointing auto` uses the same estimate: activations are recomputed in the backward
pass only where the micro-batch (MIN_ROWS for "auto") would not fit without it. Recomputing costs
about a third more compute, which a small model (launch-bound, memory to spare) should not pay and
a 7B one (8 sequences of ~1,100 tokens ran out of an H100's memory without it) cannot avoid."""
from __future__ import annotations

import torch

AUTO = "auto"
CPU_ROWS = 8
MAX_ROWS = 256
MEMORY_SHARE = 0.5
OPTIMIZER_BYTES = 12   # a trained fp32 weight's gradient (4) and AdamW's two moments (8)
MASTER_BYTES = 4       # a trained weight stored in 16 bits also has an fp32 master copy (--bf16-weights)
LOGIT_BYTES = 12       # a head row a token: logits, log-softmax and their gradient
MIN_ROWS = 4           # checkpointing auto with micro-batch auto: recompute when fewer fit without it


def activation_bytes_per_token(config, checkpointing: bool) -> int:
    """Bytes the backward keeps per token: per layer ~28 x hidden + 8 x intermediate (16-bit
    activations of attention and a gated MLP, fp32 norm inputs), or only each layer's 16-bit input
    plus one layer's worth with activation checkpointing; plus the output head's logits."""
    text = getattr(config, "text_config", None) or config
    hidden = int(getattr(text, "hidden_size", 0) or 4096)
    layers = int(getattr(text, "num_hidden_layers", 0) or 32)
    inner = int(getattr(text, "intermediate_size", 0) or 4 * hidden)
    vocab = int(getattr(text, "vocab_size", 0) or getattr(config, "vocab_size", 0) or 32000)
    per_layer = 28 * hidden + 8 * inner
    kept = (2 * hidden * layers + per_layer) if checkpointing else per_layer * layers
    return kept + LOGIT_BYTES * vocab


def state_bytes(model: torch.nn.Module) -> int:
    """Weights as stored, plus gradient and AdamW state (and an fp32 master below 32 bits) for the trained ones."""
    def trained(p):
        return OPTIMIZER_BYTES + (MASTER_BYTES if p.element_size() < 4 else 0)
    return sum(p.numel() * (p.element_size() + (trained(p) if p.requires_grad else 0)) for p in model.parameters())


def device_memory(device: torch.device) -> int:
    """Total memory of a CUDA device in bytes."""
    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def rows_that_fit(model: torch.nn.Module, device: torch.device, longest: int, checkpointing: bool,
                  reference_bytes: int = 0) -> int:
    """How many sequences of `longest` tokens a forward pass may take on a CUDA device (may be 0)."""
    room = MEMORY_SHARE * (device_memory(device) - state_bytes(model) - reference_bytes)
    per_row = max(1, longest) * activation_bytes_per_token(model.config, checkpointing)
    return max(0, int(room // per_row))


def auto_rows(model: torch.nn.Module, device: torch.device, longest: int, checkpointing: bool,
              reference_bytes: int = 0) -> int:
    """The micro-batch "auto" gives for a batch whose longest sequence has `longest` tokens."""
    if torch.device(device).type != "cuda":
        return CPU_ROWS
    rows = rows_that_fit(model, device, longest, checkpointing, reference_bytes)
    if rows < 1:
        return 1
    return min(MAX_ROWS, 1 << (rows.bit_length() - 1))


def needs_checkpointing(model: torch.nn.Module, device: torch.device, longest: int, micro_batch: int | str,
                        reference_bytes: int = 0) -> bool:
    """--gradient-checkpointing auto: recompute activations when `micro_batch` sequences (MIN_ROWS for
    "auto") of `longest` tokens would not fit without it. Never on a CPU (its memory is the host's)."""
    if torch.device(device).type != "cuda":
        return False
    wanted = MIN_ROWS if micro_batch == AUTO else int(micro_batch)
    return rows_that_fit(model, device, longest, False, reference_bytes) < wanted


def parse_checkpointing(value) -> bool | str:
    """--gradient-checkpointing: on / off / auto (or a TOML boolean) -> True / False / "auto"."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("on", "true", "1", "yes"):
        return True
    if v in ("off", "false", "0", "no"):
        return False
    if v == AUTO:
        return AUTO
    raise ValueError(value)


def parse_micro_batch(value) -> int | str:
    """--micro-batch: "auto" or a positive number of sequences (checked by RLConfig.check)."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    return int(value)
