"""sft's metrics: metrics.jsonl (appended as it trains), metrics.parquet (step, name, value) and
TensorBoard scalars when installed."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from rl3d.formats import tables
from rl3d.formats.shards import atomic_path


class Metrics:
    """metrics.jsonl (appended as we go), metrics.parquet (long: step, name, value) and TensorBoard
    when installed. Only the main process writes."""

    def __init__(self, out: Path, enabled: bool, resume_step: int):
        self.out, self.enabled = out, enabled
        self.jsonl = out / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.jsonl.is_file():  # drop what an interrupted run logged after its last checkpoint
            keep = [ln for ln in self.jsonl.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            self.jsonl.write_text("".join(ln + "\n" for ln in keep))
        try:  # optional, kept lazy: TensorBoard is not a dependency of rl3d
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)
        except Exception:  # tensorboard not installed: jsonl + parquet only
            self.tb = None

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def write_parquet(self, config: dict) -> None:
        if not self.enabled or not self.jsonl.is_file():
            return
        steps, names, values = [], [], []
        for ln in self.jsonl.read_text().splitlines():
            rec = json.loads(ln)
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    steps.append(rec["step"]), names.append(k), values.append(float(v))
        t = pa.table({"step": pa.array(steps, pa.int64()), "name": pa.array(names, pa.string()),
                      "value": pa.array(values, pa.float64())})
        t = tables.with_metadata(t, "metrics", config)
        with atomic_path(self.out / "metrics.parquet") as tmp:
            pq.write_table(t, tmp)
        if self.tb is not None:
            self.tb.flush()


def last_train_loss(path: Path) -> float | None:
    if not path.is_file():
        return None
    losses = [json.loads(ln).get("loss") for ln in path.read_text().splitlines() if ln]
    losses = [x for x in losses if x is not None]
    return losses[-1] if losses else None
