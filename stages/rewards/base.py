"""The interface every reward backend implements.

A backend scores a batch of items (one per sample) for one term and returns one TermResult per
item. A backend never invents a number: when it cannot score an item it returns a result with
value None, a status other than "ok", and a message. `per_view` holds raw per-view scores for
audit when the backend scores rendered views; the reward stage aggregates them (max/mean/min)
as the config says, so backends that score views return per_view and leave value None.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rl3d.stages.checks.check import Check, passed


@dataclass
class RewardItem:
    sample_id: str
    prompt: str
    level: str                      # "coarse" | "fine" | "single"
    image_paths: list[str]          # rendered views, in view order (may be empty)
    mesh_path: str | None = None    # GLB
    grid: object | None = None      # uint8[32,32,32] voxel grid when the codec decoded one
    spec: dict | None = None        # synth spec when the prompt came from the synth grammar
    category: str | None = None
    reasoning: str = ""             # the sample's plan / detail text


@dataclass
class TermResult:
    value: float | None = None                  # the term's raw value (None when per_view is used or on error)
    per_view: list[float] | None = None         # raw per-view scores, aggregated by the stage
    status: str = "ok"                          # "ok" | "not_applicable" | "backend_error" | "parse_error" | ...
    message: str = ""
    details: dict = field(default_factory=dict)  # sub-scores, parsed judge fields, per-attribute checks


class RewardBackend:
    """Base class. A backend is one module stages/rewards/<name>.py holding one subclass whose `name`
    is <name>: the config's `backend = "<name>"` finds it there (rewards/reward_config.py), and what the
    stages and `rl3d doctor` need to know of it are the class's own declarations below. Subclasses
    take their options in __init__ (from the config's term table) and implement score(). Models are
    loaded once, in __init__ or lazily."""

    name = "base"
    # scores rendered views: a sample without whole renders gets "missing_renders" (or the render's
    # status) instead of a call; a views-free backend is scored from the grid, mesh and prompt alone
    needs_views = False
    # a cheap, model-free function of the item (no GPU, no model load): the reward stage may score it
    # in worker processes beside the model terms when there are enough samples
    host_workers = False

    @classmethod
    def default_options(cls, term_name: str) -> dict:
        """Options a term gets when its config table leaves them out (`term_name`: the term's column)."""
        return {}

    @classmethod
    def doctor(cls, options: dict, label: str, unset: dict[str, list[str]], timeout: float) -> list[Check]:
        """What `rl3d doctor` checks of a term with these options before a run, from headers only
        (model dirs' config.json and safetensors headers, an endpoint's model list), never loading
        weights. `label` names the term in each Check; `unset`: option -> the ${VAR}s it named that
        are unset; `timeout`: seconds for a network request."""
        return [passed(label, "not checked (this backend declares no doctor check)")]

    def score(self, items: list[RewardItem]) -> list[TermResult]:
        raise NotImplementedError
