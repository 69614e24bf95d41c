"""The settings of one rl-step (`rl3d rl-step --help` names each)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from rl3d.formats.errors import InputError
from rl3d.stages.rl.micro_batch import AUTO

OLD_LOGPROBS = ("stored", "recompute")
TRAIN_LEVELS = ("all", "coarse", "fine")
# every string mode of an update and its values, the one list the checks read (the CLI's choices match it)
UPDATE_MODES = {
    "algo": ("hi-grpo", "grpo"),
    "loss_agg": ("token", "sequence", "dr-grpo"),
    "ratio": ("token", "sequence"),
    "adv_std": ("group", "none"),
    "dynamic_sampling": ("off", "zero-std", "min-std"),
    "failed_rewards": ("drop-group", "error", "penalty"),
    "old_logprobs": OLD_LOGPROBS,
    "train_levels": TRAIN_LEVELS,
}


# settings added after checkpoints and runs were made, with the value those computed with: a rerun
# or a resume compares them only when set otherwise, so what exists is still taken as made alike
ADDED_SETTINGS = {"bf16_weights": False}


def settings_compared(rl: dict) -> dict:
    """An update's recorded settings as a rerun (rl-step) or a resume (rl3d train's train.json)
    compares them: ADDED_SETTINGS left out at their old value."""
    return {k: v for k, v in rl.items() if k not in ADDED_SETTINGS or v != ADDED_SETTINGS[k]}


def check_modes(**modes: str) -> None:
    """InputError for a mode value that is not one of UPDATE_MODES[name] ("--adv-std 'grup': expected one of
    group, none"), so a typo through the Python API fails instead of silently changing the update."""
    for name, value in modes.items():
        if value not in UPDATE_MODES[name]:
            raise InputError(f"--{name.replace('_', '-')} {value!r}: expected one of {', '.join(UPDATE_MODES[name])}")


# (setting, lowest, highest) of the numbers an update consumes: anything outside is a typo or an overflow
RANGES = (("lam", 0.0, 1e3), ("beta", 0.0, 1e3), ("kl_max", 0.0, 1e6), ("clip_low", 0.0, 1.0),
          ("clip_high", 0.0, 100.0), ("std_eps", 0.0, 1.0), ("lr", 0.0, 1.0), ("weight_decay", 0.0, 10.0),
          ("max_grad_norm", 0.0, 1e6), ("min_std", 0.0, 1e6), ("failed_penalty", -1e6, 1e6),
          ("temperature", 0.0, 100.0))


@dataclass
class RLConfig:
    algo: str = "hi-grpo"            # hi-grpo | grpo
    lam: float = 1.0                 # back-flow weight of R_low into R_high
    beta: float = 0.01               # k3 KL weight; 0 loads no reference
    kl_max: float = 0.0              # per-token k3 cap (10 = verl's low_var_kl); 0 = uncapped, as the Hi-GRPO loss (docs/hi_grpo.md)
    clip_low: float = 0.2
    clip_high: float = 0.28
    loss_agg: str = "token"          # token | sequence | dr-grpo
    ratio: str = "token"             # token | sequence (GSPO)
    adv_std: str = "group"           # group | none
    std_eps: float = 1e-4
    epochs: int = 1
    minibatch: int = 0               # sequences per optimizer step; 0 = the whole batch
    micro_batch: int | str = 8       # sequences per forward pass (gradient accumulation; exact); "auto": micro_batch.py
    lr: float = 1e-6
    warmup_updates: int = 0          # linear LR warm-up over the run's first N optimizer updates
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dynamic_sampling: str = "off"    # off | zero-std | min-std
    min_std: float = 0.0
    failed_rewards: str = "drop-group"  # drop-group | error | penalty
    failed_penalty: float = 0.0      # the total a policy failure (empty mesh) gets under "penalty"
    gradient_checkpointing: bool | str = False  # True | False | "auto": micro_batch.needs_checkpointing
    old_logprobs: str = "stored"     # pi_old: stored (gen's log-probs) | recompute (no-grad pass before the update)
    length_buckets: bool = False     # sort each minibatch's sequences by length before cutting micro-batches
    fused_adamw: bool = True         # torch's fused AdamW kernel when every trained weight is on CUDA
    bf16_weights: bool = False       # trained weights in bf16, their fp32 masters in the optimizer (master_weights.py)
    seed: int = 0
    temperature: float | None = None  # None: the temperature the samples were drawn with
    train_levels: str = "all"        # hi-grpo: all | coarse | fine, the level whose tokens train (ablations)
    tis_cap: float = 0.0             # truncated importance sampling cap C (needs old_logprobs recompute); 0 = off

    def __post_init__(self):
        check_modes(**{name: getattr(self, name) for name in UPDATE_MODES})

    def check(self) -> "RLConfig":
        """Settings under which a step cannot train are an error, not a step that learned nothing."""
        for name, low in (("epochs", 1), ("micro_batch", 1), ("minibatch", 0), ("warmup_updates", 0)):
            v = getattr(self, name)
            if name == "micro_batch" and v == AUTO:
                continue
            if isinstance(v, str) or v < low:
                raise InputError(f"--{name.replace('_', '-')} {v}: must be >= {low}"
                                 + (f" or {AUTO}" if name == "micro_batch" else ""))
        if self.gradient_checkpointing not in (True, False, AUTO):
            raise InputError(f"--gradient-checkpointing {self.gradient_checkpointing}: expected on, off or {AUTO}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v) and not (f.name == "tis_cap" and v == math.inf):
                raise InputError(f"--{f.name.replace('_', '-')} {v}: must be a finite number")
        check_modes(**{name: getattr(self, name) for name in UPDATE_MODES})  # also after a field was set later
        if self.train_levels != "all" and self.algo != "hi-grpo":
            raise InputError(f"--train-levels {self.train_levels}: only --algo hi-grpo has levels to choose from")
        if self.tis_cap < 0:
            raise InputError(f"--tis-cap {self.tis_cap}: must be >= 0 (0 = off)")
        if self.tis_cap > 0 and self.old_logprobs != "recompute":
            raise InputError("--tis-cap weights pi_old / pi_behaviour: it needs --old-logprobs recompute")
        if self.lr < 0:
            raise InputError(f"--lr {self.lr}: must be >= 0")
        for name, low, high in RANGES:  # absurd values train without a word (a negative KL weight, a huge lr)
            v = getattr(self, name)
            if v is not None and not low <= v <= high:
                raise InputError(f"--{name.replace('_', '-')} {v}: expected {low:g} <= value <= {high:g}")
        if self.std_eps <= 0 or (self.temperature is not None and self.temperature <= 0):
            which = "std-eps" if self.std_eps <= 0 else "temperature"
            raise InputError(f"--{which} {getattr(self, which.replace('-', '_'))}: must be > 0")
        return self
