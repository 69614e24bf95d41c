"""The rows of eval's metrics table: one per (policy, category, metric), a value or a skip reason."""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from rl3d.stages.scoring import registry

ALL = "all"  # the category value of overall rows


def metric_row(policy: str, category: str, metric: str, value=None, n: int = 0, std=None,
               status: str = "ok", message: str = "", **extra) -> dict:
    value = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    if status == "ok" and value is None:
        status, message = "skipped", message or "no value"
    return {"name": f"{category}/{metric}", "value": value, "policy": policy, "category": category,
            "metric": metric, "n": int(n), "std": None if std is None or not np.isfinite(std) else float(std),
            "status": status, "message": message, "higher_is_better": registry.direction(metric),
            **extra}


def skipped(policy: str, categories: list[str], metric: str, reason: str) -> list[dict]:
    return [metric_row(policy, c, metric, status="skipped", message=reason) for c in [ALL, *categories]]


METRIC_TYPES = {"name": pa.string(), "value": pa.float64(), "policy": pa.string(), "category": pa.string(),
                "metric": pa.string(), "n": pa.int64(), "std": pa.float64(), "status": pa.string(),
                "message": pa.string(), "higher_is_better": pa.bool_(), "policy_id": pa.string(),
                "bench": pa.string(), "feature_model": pa.string()}


def metrics_table(rows: list[dict]) -> pa.Table:
    return pa.table({c: pa.array([r.get(c) for r in rows], t) for c, t in METRIC_TYPES.items()})
