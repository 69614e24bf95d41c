"""The prompts of each step: a dataset read once and consumed in batches, reshuffled by seed each
epoch, or fresh shape-world prompts per step. The batch of step s is a function of (seed, s), so
a resumed run continues at the same position without any state beyond the step number."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from rl3d.formats.errors import InputError
from rl3d.formats.prompts import read_prompts
from rl3d.stages.contract import Job
from rl3d.stages.synth import SynthJob

SYNTH = "synth"  # --prompts synth: shape-world prompts drawn fresh each step


class PromptFeed:
    """`source`: any prompt file or table the commands read, or "synth"."""

    def __init__(self, source: str, per_step: int, seed: int):
        if per_step < 1:
            raise InputError(f"--prompts-per-step {per_step}: must be >= 1")
        self.source, self.seed = str(source), int(seed)
        self.table = None if self.source == SYNTH else read_prompts(source)
        if self.table is not None and self.table.num_rows == 0:
            raise InputError(f"{source}: no prompts")
        n = self.table.num_rows if self.table is not None else per_step
        self.per_step = min(per_step, n)  # all of them if fewer

    def position(self, step: int) -> dict:
        """Where step `step` (1-based) starts: the epoch and the offset in its shuffled order."""
        if self.table is None:
            return {"epoch": 0, "offset": 0}
        start = (step - 1) * self.per_step
        return {"epoch": start // self.table.num_rows, "offset": start % self.table.num_rows}

    def indices(self, step: int) -> list[int]:
        """Row indices of step `step`'s prompts: consecutive slices of one permutation per epoch."""
        n, out = self.table.num_rows, []
        start = (step - 1) * self.per_step
        for k in range(start, start + self.per_step):
            epoch, offset = divmod(k, n)
            out.append(int(self._order(epoch)[offset]))
        return out

    def _order(self, epoch: int) -> np.ndarray:
        if not hasattr(self, "_orders"):
            self._orders: dict[int, np.ndarray] = {}
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.table.num_rows)
        return self._orders[epoch]

    def job(self, step: int) -> Job:
        """The Job that writes step `step`'s prompts table."""
        if self.table is None:
            # a seed per step: every step draws objects no other step draws
            return SynthJob(self.per_step, self.seed * 1_000_003 + step, "train", meshes=False)
        return PromptBatchJob(self.table, self.indices(step), self.source, step)


class PromptBatchJob(Job):
    """One step's rows of a prompts dataset, written as a prompts table (same columns as read)."""

    stage, kind = "prompts", "prompts"

    def __init__(self, table: pa.Table, indices: list[int], source: str, step: int):
        self.table, self.indices, self.source, self.step = table, indices, source, step

    def config(self) -> dict:
        return {"stage": "prompts", "source": str(Path(self.source).resolve()), "step": self.step,
                "prompt_ids": [self.table.column("prompt_id")[i].as_py() for i in self.indices]}

    def produce(self, shard, progress):
        rows = self.table.take(pa.array(self.indices, pa.int64()))
        if shard.count > 1:
            keep = [i for i, p in enumerate(rows.column("prompt_id").to_pylist()) if shard.owns(p)]
            rows = rows.take(pa.array(keep, pa.int64()))
        return rows, {"prompts": rows.num_rows}
