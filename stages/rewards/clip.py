"""CLIP-family reward terms: prompt vs each rendered view with a transformers CLIPModel loaded
from a local directory (default: the scorer shipped in rl3d.assets/scorer, trained by
`rl3d train-scorer`).

Metrics (per view; the stage aggregates views):
  clip_score  max(100 * cos(text, image), 0)          as torchmetrics' CLIPScore, in [0, 100]
  pickscore   logit_scale.exp() * cos(text, image)     PickScore-style preference logit
  cosine      cos(text, image)                         in [-1, 1]
"""
from __future__ import annotations

import os
from collections import OrderedDict
from importlib.resources import files
from pathlib import Path

import numpy as np

from rl3d.formats.errors import InputError
from rl3d.formats.model_dirs import from_local_dir
from rl3d.stages.policy.device import pick_device
from rl3d.stages.rewards.base import RewardBackend, RewardItem, TermResult

METRICS = ("clip_score", "pickscore", "cosine")
_SCORERS: dict[tuple[str, str], "ClipScorer"] = {}


def default_scorer_dir() -> Path:
    return Path(str(files("rl3d.assets") / "scorer"))


def load_rgb(path: str | os.PathLike, background=(255, 255, 255)):
    """An image as RGB; transparent pixels composited over `background` (renders may be RGBA).
    Training (`rl3d train-scorer`) and scoring load images the same way."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, tuple(background) + (255,))
            return Image.alpha_composite(bg, im).convert("RGB")
        return im.convert("RGB")


def load_processors(model_dir: str | os.PathLike):
    """(tokenizer, image processor) from a CLIP model dir, PIL image backend (no torchvision)."""
    from transformers import AutoTokenizer

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4.x: the PIL-based processor is the plain one
        from transformers import CLIPImageProcessor as ImageProcessor
    return (from_local_dir(AutoTokenizer, model_dir, "CLIP tokenizer"),
            from_local_dir(ImageProcessor, model_dir, "CLIP image processor"))


def _pooled(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out


class ClipScorer:
    """A CLIPModel + its processors; normalised embeddings with small per-process caches so that
    several terms over the same model (clip_score and pickscore) encode each view once."""

    def __init__(self, model_dir: str | os.PathLike, device: str = "auto", cache_size: int = 8192):
        import torch
        from transformers import CLIPModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no per-load bars in stage logs
        d = Path(model_dir)
        if not (d / "config.json").is_file():
            raise InputError(f"CLIP model dir {d}: no config.json (a transformers CLIPModel saved with "
                             f"save_pretrained is expected)")
        self.device = pick_device(device)
        self.model = from_local_dir(CLIPModel, d, "CLIP model", dtype=torch.float32).to(self.device).eval()
        self.tokenizer, self.image_processor = load_processors(d)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.logit_scale = float(self.model.logit_scale.detach().exp().cpu())
        self._img: OrderedDict[str, np.ndarray] = OrderedDict()
        self._txt: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_size = cache_size

    def text_embeddings(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        return self._cached(self._txt, texts, self._encode_texts, batch_size)

    def image_embeddings(self, paths: list[str], batch_size: int = 64) -> np.ndarray:
        return self._cached(self._img, [str(p) for p in paths], self._encode_images, batch_size)

    def _cached(self, cache: OrderedDict, keys: list[str], encode, batch_size: int) -> np.ndarray:
        todo = list(dict.fromkeys(k for k in keys if k not in cache))
        failed: dict[str, np.ndarray] = {}
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            fresh = dict(zip(chunk, encode(chunk)))
            cache.update({k: e for k, e in fresh.items() if not np.isnan(e).any()})
            failed.update({k: e for k, e in fresh.items() if np.isnan(e).any()})
        out = np.stack([cache.get(k, failed.get(k)) for k in keys]) if keys else np.zeros((0, 1), np.float32)
        while len(cache) > self.cache_size:
            cache.popitem(last=False)
        return out

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        import torch

        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            f = _pooled(self.model.get_text_features(**{k: v.to(self.device) for k, v in enc.items()}))
            return torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy()

    def _encode_images(self, paths: list[str]) -> np.ndarray:
        """Embeddings of the readable images; an unreadable one gets a NaN row (its item fails alone)."""
        import torch

        images, ok = [], []
        for p in paths:
            try:
                images.append(load_rgb(p))
                ok.append(True)
            except (OSError, ValueError):
                ok.append(False)
        out = np.full((len(paths), self.model.config.projection_dim), np.nan, np.float32)
        if images:
            px = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                f = _pooled(self.model.get_image_features(pixel_values=px.to(self.device)))
                out[np.asarray(ok)] = torch.nn.functional.normalize(f.float(), dim=-1).cpu().numpy()
        return out


def load_scorer(model_dir: str | os.PathLike | None = None, device: str = "auto") -> ClipScorer:
    """One ClipScorer per (dir, device) per process."""
    d = str(Path(model_dir) if model_dir else default_scorer_dir())
    key = (os.path.realpath(d), pick_device(device))
    if key not in _SCORERS:
        _SCORERS[key] = ClipScorer(d, device)
    return _SCORERS[key]


def view_scores(cos: np.ndarray, metric: str, logit_scale: float) -> np.ndarray:
    if metric == "clip_score":
        return np.maximum(100.0 * cos, 0.0)
    if metric == "pickscore":
        return logit_scale * cos
    return cos


class ClipBackend(RewardBackend):
    """Options: model (CLIP dir; "" = shipped default scorer), metric (clip_score | pickscore |
    cosine), batch_size (views per forward pass), device (auto | cpu | cuda[:i])."""

    name = "clip"
    needs_views = True

    def __init__(self, model: str = "", metric: str = "clip_score", batch_size: int = 64, device: str = "auto"):
        if metric not in METRICS:
            raise InputError(f"unknown clip metric {metric!r} (known: {', '.join(METRICS)})")
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
            img = self.scorer.image_embeddings(paths, self.batch_size)
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
