"""`rl3d sft`: supervised warm start of a policy on synth objects, in exactly the sequence format
gen produces (docs/internals.md "Policy sequences"):

    flat:     build_prompt(p, "single")          | detail | <mesh-start> tokens(grid)          <mesh-end> eos
    hi-grpo:  build_prompt(p, "coarse")          | plan   | <mesh-start> tokens(coarsen(grid)) <mesh-end> eos
              build_prompt(p, "fine", plan=plan) | detail | <mesh-start> tokens(grid)          <mesh-end> eos
    both:     the three sequences above (a policy usable by gen in either mode)

The loss is next-token cross-entropy on completion tokens only (prompt positions are -100).
The library is stages/supervised/: options.py (SFTOptions, the --config shapes), data.py (objects ->
packed sequences, the data order), model.py, trainer.py (the loop), checkpoints.py, metrics.py.
Training runs under accelerate (CPU, one GPU, `accelerate launch` for several), checkpoints
every --save-every steps into OUT/checkpoints/step-NNNNNN/ (a policy dir written by save_policy,
plus trainer_state.pt: optimizer, scheduler, RNG and the data cursor) and resumes from the latest
one. The data order is a pure function of (seed, step), so a resumed run replays the uninterrupted
one exactly on CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

from rl3d.stages.contract import DirJob, Progress, StageOptions
from rl3d.stages.policy.checkpoint import POLICY_META
from rl3d.stages.supervised.checkpoints import check_run_config
from rl3d.stages.supervised.options import SFTOptions
from rl3d.stages.supervised.trainer import train


class SFTJob(DirJob):
    """An sft run folder: done once final/ holds its rl3d_policy.json (save_policy writes final/ whole);
    before that, a rerun resumes from the latest checkpoint (in place, each checkpoint written whole)."""

    stage, marker, what, in_place = "sft", f"final/{POLICY_META}", "a finished sft run", True

    def __init__(self, options: SFTOptions):
        options.check()
        self.options = options

    def config(self) -> dict:
        return self.options.trajectory_key()

    def check_done_config(self, out: Path) -> None:
        check_run_config(out, self.config())

    def skip(self, out: Path, progress: Progress) -> dict:
        return {"final": str(out / "final"), "steps": json.loads((out / self.marker).read_text())["step"]}

    def build(self, into: Path, opts: StageOptions, progress: Progress) -> dict:
        return train(self.options, into, opts.overwrite, progress)
