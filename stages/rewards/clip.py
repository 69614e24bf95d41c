"""The `clip` reward backend: prompt vs each rendered view through the one CLIP scorer
(stages/scoring/clip_scorer.py, shared with the eval's CLIP score). Default model: the scorer shipped in
rl3d/assets/scorer, trained by `rl3d train-scorer`.

Metrics (per view; the stage aggregates views):
  clip_score  max(100 * cos(text, image), 0)          as torchmetrics' CLIPScore, in [0, 100]
  pickscore   logit_scale.exp() * cos(text, image)     PickScore-style preference logit
  cosine      cos(text, image)                         in [-1, 1]
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rl3d.formats.errors import InputError
from rl3d.stages.checks.check import Check, env_fix, passed, problem
from rl3d.stages.checks.model_dir import check_model_dir, has_tokenizer_files
from rl3d.stages.rewards.base import RewardBackend, RewardItem, TermResult
from rl3d.stages.scoring.clip_scorer import CLIP_METRICS, PREPROCESS, default_scorer_dir, load_scorer, view_scores


class ClipBackend(RewardBackend):
    """Options: model (CLIP dir; "" = shipped default scorer), metric (clip_score | pickscore |
    cosine), batch_size (views per forward pass), device (auto | cpu | cuda[:i]), preprocess
    (device: resize, crop and normalise the views in torch on the scorer's device, within a grey
    level or two of the image processor's pixels (scores within ~0.05 of 100); pil: the image
    processor on the CPU, as the eval's CLIP score does; auto (default): device on a GPU, pil on
    a CPU)."""

    name = "clip"
    needs_views = True

    @classmethod
    def doctor(cls, options: dict, label: str, unset: dict[str, list[str]], timeout: float) -> list[Check]:
        """The shipped scorer is built, or option model is a CLIP dir with its tokenizer and image processor."""
        if not options.get("model"):
            if unset.get("model"):
                return [problem(label, f"option model names {unset['model'][0]}, which is unset, so the shipped "
                                       f"scorer would be used", env_fix(unset, ("model",)))]
            d = default_scorer_dir()
            return [passed(label, f"the shipped scorer {d}")] if (d / "config.json").is_file() else \
                [problem(label, f"the shipped scorer {d} is not built", "run rl3d train-scorer, or set option model")]
        d = Path(options["model"])
        checks, _ = check_model_dir(d, label, "CLIPModel", "set option model to a local CLIP dir (config.json, "
                                                           "safetensors, tokenizer, preprocessor_config.json)")
        if d.is_dir() and checks[0].ok:
            if not has_tokenizer_files(d):
                checks.append(problem(label + " tokenizer", f"no tokenizer files in {d}",
                                      "save the CLIP tokenizer into the dir"))
            if not (d / "preprocessor_config.json").is_file():
                checks.append(problem(label + " image processor", f"no preprocessor_config.json in {d}",
                                      "save the CLIP image processor into the dir"))
        return checks

    def __init__(self, model: str = "", metric: str = "clip_score", batch_size: int = 64, device: str = "auto",
                 preprocess: str = "auto"):
        if metric not in CLIP_METRICS:
            raise InputError(f"unknown clip metric {metric!r} (known: {', '.join(CLIP_METRICS)})")
        if preprocess not in PREPROCESS:
            raise InputError(f"unknown clip preprocess {preprocess!r} (known: {', '.join(PREPROCESS)})")
        self.preprocess = preprocess
        d = Path(model) if model else default_scorer_dir()
        if not d.is_dir():
            raise InputError(f"option model: CLIP model dir {d} does not exist")
        self.metric, self.batch_size = metric, int(batch_size)
        self.scorer = load_scorer(d, device)

    def score(self, items: list[RewardItem]) -> list[TermResult]:
        results: list[TermResult | None] = [None] * len(items)
        paths, owner = [], []
        for i, it in enumerate(items):
            if not it.image_paths:
                results[i] = TermResult(status="missing_renders", message="no rendered views")
                continue
            missing = [p for p in it.image_paths if not os.path.isfile(p)]
            if missing:
                results[i] = TermResult(status="image_error", message=f"{missing[0]}: no such file")
                continue
            paths.extend(it.image_paths)
            owner.extend([i] * len(it.image_paths))
        if paths:
            img = self.scorer.image_embeddings(paths, self.batch_size, self.preprocess)
            txt = self.scorer.text_embeddings([items[i].prompt for i in owner])
            per = view_scores((img * txt).sum(-1), self.metric, self.scorer.logit_scale)
            owner_a = np.asarray(owner)
            for i in dict.fromkeys(owner):
                mine = per[owner_a == i]
                if np.isnan(mine).any():
                    bad = items[i].image_paths[int(np.flatnonzero(np.isnan(mine))[0])]
                    results[i] = TermResult(status="image_error", message=f"{bad}: not a readable image")
                else:
                    results[i] = TermResult(per_view=[float(v) for v in mine])
        return results
