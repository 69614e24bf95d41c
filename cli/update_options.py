"""The policy update's options (one RLConfig field each), shared by `rl3d rl-step` and `rl3d train`."""
from __future__ import annotations

import click

from rl3d.formats.errors import InputError
from rl3d.stages.rl.micro_batch import parse_checkpointing, parse_micro_batch


class MicroBatch(click.ParamType):
    """--micro-batch: a number of sequences or "auto" (stages/rl/micro_batch.py)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        try:
            return parse_micro_batch(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r}: expected a number of sequences or auto", param, ctx)


MICRO_BATCH = MicroBatch()


class Checkpointing(click.ParamType):
    """--gradient-checkpointing [on|off|auto] (alone: on)."""

    name = "on|off|auto"

    def convert(self, value, param, ctx):
        try:
            return parse_checkpointing(value)
        except ValueError:
            self.fail(f"{value!r}: expected on, off or auto", param, ctx)


def update_options(f):
    """The update's options (one RLConfig field each), shared by `rl3d rl-step` and `rl3d train`."""
    for option in reversed(UPDATE_OPTIONS):
        f = option(f)
    return f


UPDATE_OPTIONS = [
    click.option("--lambda", "lam", type=float, default=1.0, show_default=True,
                  help="Back-flow: level-2 reward added to level 1 (R_high + lambda * R_low)."),
    click.option("--beta", type=float, default=0.01, show_default=True, help="k3 KL weight; 0 loads no reference."),
    click.option("--kl-max", type=click.FloatRange(min=0), default=0.0, show_default=True,
                  help="Cap on the per-token k3 KL (10 = verl's low_var_kl); 0 leaves it uncapped, as the Hi-GRPO "
                       "loss does (docs/rl.md)."),
    click.option("--clip-low", type=float, default=0.2, show_default=True,
                  help="PPO clip below: the ratio is clipped at 1 - clip-low."),
    click.option("--clip-high", type=float, default=0.28, show_default=True,
                  help="PPO clip above: the ratio is clipped at 1 + clip-high (DAPO's clip-higher)."),
    click.option("--loss-agg", type=click.Choice(["token", "sequence", "dr-grpo"]), default="token", show_default=True,
                  help="Loss mean per level: token: over all tokens (DAPO); sequence: per sequence, then over "
                       "sequences (GRPO); dr-grpo: over sequences x the longest completion."),
    click.option("--ratio", type=click.Choice(["token", "sequence"]), default="token", show_default=True,
                  help="Importance ratio per token, or per sequence (GSPO-style geometric mean)."),
    click.option("--adv-std", type=click.Choice(["group", "none"]), default="group", show_default=True,
                  help="Divide advantages by the group's reward std (group) or only centre them (none, Dr. GRPO)."),
    click.option("--std-eps", type=float, default=1e-4, show_default=True,
                  help="Added to the group std before dividing (--adv-std group)."),
    click.option("--epochs", type=int, default=1, show_default=True, help="Passes over the samples in this step."),
    click.option("--minibatch", type=int, default=0, show_default=True,
                  help="Sequences per optimizer step (0 = the whole batch, one update per epoch)."),
    click.option("--micro-batch", type=MICRO_BATCH, default="auto", show_default=True,
                  help="Sequences per forward pass (gradient accumulation; the update is the same). auto: 8 on a "
                       "CPU; on a GPU the most (a power of two, at most 256) whose estimated activations fill "
                       "half the memory the weights and optimizer leave."),
    click.option("--lr", type=float, default=1e-6, show_default=True, help="Learning rate (AdamW)."),
    click.option("--warmup-updates", type=click.IntRange(min=0), default=0, show_default=True,
                  help="Linear LR warm-up over the run's first N optimizer updates (counted across steps)."),
    click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Gradient clipping (global L2 norm)."),
    click.option("--dynamic-sampling", default="off", show_default=True, metavar="off|zero-std|min-std:X",
                  help="Drop groups without reward spread: zero-std drops groups whose rewards are all equal, "
                       "min-std:X groups whose reward std is below X."),
    click.option("--failed-rewards", type=click.Choice(["drop-group", "error", "penalty"]), default="drop-group",
                  show_default=True, help="A sample without a reward: drop its group, stop, or (penalty) score a "
                  "policy failure (decode_error: an empty mesh) --failed-penalty; other failures drop the group."),
    click.option("--failed-penalty", type=float, default=0.0, show_default=True,
                  help="Total reward of a failed sample under --failed-rewards penalty (per level)."),
    click.option("--train-levels", type=click.Choice(["all", "coarse", "fine"]), default="all", show_default=True,
                  help="hi-grpo: train both levels' tokens, or one level's only (an ablation); the other level's "
                       "rewards still reach the advantages through the back-flow."),
    click.option("--gradient-checkpointing", type=Checkpointing(), is_flag=False, flag_value="on", default="off",
                  show_default=True,
                  help="Recompute activations in the backward pass (less memory, about a third more compute); "
                       "alone means on. auto: only where the micro-batch (4 sequences under --micro-batch auto) "
                       "would not fit the card's memory without it, judged each update from its longest sequence; "
                       "off on a CPU."),
    click.option("--old-logprobs", type=click.Choice(["stored", "recompute"]), default="stored", show_default=True,
                  help="pi_old of the ratio: the log-probs gen stored, or recompute them with a no-grad pass of the "
                       "policy before the update (verl's default; one more forward). docs/rl.md: the mismatch metrics."),
    click.option("--length-buckets", is_flag=True,
                  help="Cut micro-batches from each minibatch in length order (less padding; the same gradient up to "
                       "float summation order)."),
    click.option("--fused-adamw/--no-fused-adamw", default=True, show_default=True,
                  help="torch's fused AdamW kernel when every trained weight is on CUDA (no effect on CPU)."),
    click.option("--bf16-weights/--no-bf16-weights", default=False, show_default=True,
                  help="Keep the trained weights in bf16 and their float32 master copies (and AdamW's state) in "
                       "the optimizer: no cast of every weight for every product under autocast. Gradients sum "
                       "and clip in float32; checkpoints hold the float32 masters. Needs bf16 compute (CUDA, or "
                       "--dtype bfloat16 on a CPU); not with --lora-rank or FSDP. Not yet measured on a GPU, hence "
                       "off by default."),
    click.option("--tis-cap", type=float, default=0.0, show_default=True,
                  help="Truncated importance sampling: weight each token by min(pi_old / pi_behaviour, C) (needs "
                       "--old-logprobs recompute; `rl3d train --overlap 1` sets C = 2). 0 = off."),
]


def parse_dynamic_sampling(value: str) -> tuple[str, float]:
    """--dynamic-sampling off | zero-std | min-std:X -> (mode, X)."""
    if value.startswith("min-std"):
        try:
            return "min-std", float(value.split(":", 1)[1])
        except (IndexError, ValueError):
            raise InputError(f"--dynamic-sampling {value!r}: expected min-std:X, e.g. min-std:0.05") from None
    if value not in ("off", "zero-std"):
        raise InputError(f"--dynamic-sampling {value!r}: expected off, zero-std or min-std:X")
    return value, 0.0
