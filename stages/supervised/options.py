"""The options of an sft run (`rl3d sft`), the named model shapes of --config, and which options decide
its trajectory (a resumed or skipped run must match them)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from rl3d.formats.errors import InputError
from rl3d.stages.policy.sequence import MODE_LEVELS

SFT_MODES = tuple(MODE_LEVELS)  # hi-grpo, flat, both

QWEN2_COMMON = dict(max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
               attention_dropout=0.0, hidden_act="silu", initializer_range=0.02, use_cache=True)
# Named Qwen2ForCausalLM shapes for training from scratch. "default" is the shipped policy
# (~9.9M parameters with the shipped codec's 20465 mesh tokens: ~20 MB as bfloat16 safetensors).
CONFIGS = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64),
    "default": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=704),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=1408),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 intermediate_size=2048),
}


@dataclass
class SFTOptions:
    data: Path
    init: Path | None = None
    config: str | None = None
    mode: str = "hi-grpo"
    codec: Path | None = None
    text_vocab: int = 1024
    batch_size: int = 16
    grad_accum: int = 1
    steps: int | None = None
    epochs: float | None = None
    lr: float = 3e-4
    warmup: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    eval_every: int | None = None
    eval_rows: int = 512
    eval_fraction: float = 0.02
    save_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 10
    save_dtype: str = "float32"
    seed: int = 0

    def trajectory_key(self) -> dict:
        """The options that decide the training trajectory: a resume must match them."""
        d = asdict(self)
        for k in ("eval_every", "save_every", "keep_checkpoints", "log_every", "save_dtype", "eval_rows"):
            d.pop(k)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}

    def check(self) -> None:
        """Refuse unknown names and contradicting options before anything is read or written."""
        if self.mode not in SFT_MODES:
            raise InputError(f"--mode: unknown mode {self.mode!r} (choose from {', '.join(SFT_MODES)})")
        if (self.init is None) == (self.config is None):
            raise InputError("sft: give exactly one of --init DIR (fine-tune a checkpoint) or --config NAME (from scratch)")
        if self.config is not None and self.config not in CONFIGS:
            raise InputError(f"--config: unknown config {self.config!r} (choose from {', '.join(CONFIGS)})")
        if self.steps is not None and self.epochs is not None:
            raise InputError("sft: give --steps or --epochs, not both")
        if self.save_dtype not in ("float32", "bfloat16", "float16"):
            raise InputError(f"--save-dtype: unknown dtype {self.save_dtype!r}")
