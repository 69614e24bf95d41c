"""The options of `rl3d eval` and its metric groups."""
from __future__ import annotations

from dataclasses import dataclass, field

from rl3d.formats.errors import InputError

METRIC_GROUPS = ("decode", "clip", "kd", "fd", "spec", "geometry", "diversity", "reference_iou")
# computed only when named in --metrics: the paper's "KD" (a mean RBF similarity, for placing numbers beside
# its published table; rl3d's KD is kd_x100)
OPTIONAL_GROUPS = ("kd_paper",)
FEATURE_GROUPS = {"kd", "fd", "kd_paper"}  # the groups that need the feature model and reference renders


@dataclass
class EvalOptions:
    bench: str
    policies: list[str]
    references: str | None = None
    metrics: tuple[str, ...] = METRIC_GROUPS
    samples_per_prompt: int = 4
    limit: int | None = None             # prompts per category
    feature_model: str | None = None
    clip_model: str | None = None
    seed: int = 0
    mode: str = "auto"                   # "auto" | "hi-grpo" | "flat"
    views: int = 6
    resolution: int = 256
    supersample: int = 2                 # render anti-aliasing: K x K rays per pixel
    device: str | None = None
    batch_size: int = 32
    kd_subsets: int = 100
    kd_subset_size: int = 1000
    grid_prompts: int = 6
    workers: int | None = None           # render processes (None: the render stage's default)
    runs: list[str] = field(default_factory=list)
    overwrite: bool = False
    quiet: bool = False

    def check(self) -> None:
        """Refuse unknown metric groups and impossible counts before anything is read or written."""
        unknown = set(self.metrics) - set(METRIC_GROUPS + OPTIONAL_GROUPS)
        if unknown:
            raise InputError(f"--metrics: unknown {', '.join(sorted(unknown))} "
                             f"(choose from {', '.join(METRIC_GROUPS + OPTIONAL_GROUPS)})")
        if not self.policies:
            raise InputError("--policy: give at least one policy directory")
        if self.samples_per_prompt < 1:
            raise InputError("--samples-per-prompt must be >= 1")
