"""The one list of eval metrics: name, direction, report order, label and number format.

The eval writes `higher_is_better` into its metrics table from here; the report orders, labels and
formats its tables and charts from here. A new metric gets one `Metric` line in REPORTED_METRICS (in the
order the report should show it). Per-attribute rows ("spec_accuracy:color") take the direction of
their base metric and are labelled by their full name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def format_value(v) -> str:
    """3 decimals below 10, 2 from there; "-" for a missing value."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    higher_is_better: bool | None   # None: descriptive, no better direction

    def format(self, v) -> str:
        return format_value(v)


REPORTED_METRICS = (
    Metric("clip_score", "CLIP score", True),
    Metric("kd_x100", "KD x100", False),
    Metric("fd", "FD", False),
    # the paper's eval-script "KD" (mean RBF similarity, --metrics ...,kd_paper): no direction claimed
    Metric("kd_paper", "KD as the paper's script (mean RBF similarity)", None),
    Metric("spec_accuracy", "spec accuracy", True),
    Metric("spec_all_correct", "spec all correct", True),
    Metric("reference_iou", "IoU vs ground truth", True),
    Metric("single_component_rate", "single component", True),
    Metric("grounded_rate", "grounded", True),
    Metric("stable_rate", "stable", True),
    Metric("watertight_rate", "watertight", True),
    Metric("diversity_iou", "diversity (pairwise IoU, lower = more diverse)", None),
    Metric("decode_failure_rate", "decode failures", False),
)
BY_NAME = {m.name: m for m in REPORTED_METRICS}


def direction(metric: str) -> bool | None:
    """higher_is_better of a metric row's name (per-attribute rows: their base metric's)."""
    m = BY_NAME.get(metric.split(":")[0])
    return m.higher_is_better if m else None


def label(metric: str) -> str:
    m = BY_NAME.get(metric)
    return m.label if m else metric


def metric_order(names) -> list[str]:
    """Registry order first, then unknown names sorted (per-attribute rows among them)."""
    names = list(dict.fromkeys(names))
    known = [m.name for m in REPORTED_METRICS if m.name in names]
    return known + sorted(m for m in names if m not in known)
