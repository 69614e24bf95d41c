"""The procedural shape world: object i of seed s, drawn from its own generator seeded by (s, i),
with its spec, a caption, a level-1 plan and a level-2 detail text (Hi-GRPO reasoning targets) and
its coloured 32^3 voxel grid. `rl3d synth` writes these objects as a table; the eval's built-in
benchmark draws its prompts and ground truth from them.

Split rule: rare compositions (held-out families and held-out family x attribute combinations,
category "rare_entities") are always "eval"; every other object is "train" with probability
TRAIN_FRACTION, decided by its own generator. `split="train"` draws only common objects and
labels them train; `split="eval"` draws from every category and labels them eval.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rl3d.formats.errors import InputError
from rl3d.stages.shapes import CATEGORIES, FAMILIES
from rl3d.stages.shapes.base import choose

TRAIN_FRACTION = 0.85
SPLITS = ("train", "eval", "all")
RARE = "rare_entities"
CATEGORY_WORDS = {"spatial_structural": "spatial structure", "mechanical_affordance": "mechanical affordance",
                  "physical_plausibility": "physical plausibility", "organic_forms": "organic form",
                  "rare_entities": "rare entity", "stylized_abstract": "stylized abstract"}

_TEMPLATES = (
    "{subj} with {feats}",
    "{Subj} with {feats}.",
    "{subj}, with {feats}",
    "a voxel model of {subj} with {feats}",
    "3D model: {subj} with {feats}",
    "{subj} that has {feats}",
    "make {subj} with {feats}",
    "{Subj}. It has {feats}.",
    "a blocky {subj_bare} with {feats}",
    "generate {subj} with {feats}",
)


@dataclass
class SynthObject:
    sample_id: str
    category: str
    family: str
    split: str
    caption: str
    plan: str
    detail: str
    spec: dict
    grid: np.ndarray


def object_id(index: int, seed: int) -> str:
    return f"syn-s{seed}-{index:06d}"


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, index]))


def _families_of(category: str) -> list[str]:
    if category == RARE:
        return [n for n, f in FAMILIES.items() if f.held_out or f.has_rare()]
    return [n for n, f in FAMILIES.items() if f.category == category and not f.held_out]


def _active_categories() -> tuple[str, ...]:
    return tuple(c for c in CATEGORIES if _families_of(c))


def draw_spec(rng: np.random.Generator, split: str | None) -> tuple[dict, str]:
    """Pick category, family and spec for one object; return (spec, split label)."""
    cats = _active_categories()
    if split == "train":
        cats = tuple(c for c in cats if c != RARE)
    category = choose(rng, cats)
    fam = FAMILIES[choose(rng, _families_of(category))]
    rare = category == RARE
    spec = fam.sample(rng, rare=rare and not fam.held_out)
    spec["category"] = category
    if split in ("train", "eval"):
        label = split
    else:
        label = "eval" if rare else ("train" if rng.random() < TRAIN_FRACTION else "eval")
    return spec, label


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(spec: dict, rng: np.random.Generator) -> str:
    fam = FAMILIES[spec["family"]]
    subj = fam.subject(spec, rng)
    feats = list(fam.features(spec, rng))
    feats = [feats[i] for i in rng.permutation(len(feats))]
    tpl = choose(rng, _TEMPLATES)
    bare = subj.split(" ", 1)[1] if subj.startswith(("a ", "an ")) else subj
    if not feats:
        tpl = tpl.split(" with ")[0].replace(" that has {feats}", "").replace(". It has {feats}.", ".")
    return tpl.format(subj=subj, Subj=subj[:1].upper() + subj[1:], subj_bare=bare, feats=_join(feats) if feats else "")


def plan_text(spec: dict) -> str:
    return f"Category: {CATEGORY_WORDS[spec['category']]}. " + FAMILIES[spec["family"]].plan(spec)


def detail_text(spec: dict) -> str:
    return FAMILIES[spec["family"]].detail(spec)


def build_grid(spec: dict) -> np.ndarray:
    return FAMILIES[spec["family"]].build(spec).grid()


def make_object(index: int, seed: int, split: str | None = None) -> SynthObject:
    if split not in (None, "all", "train", "eval"):
        raise InputError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    rng = _rng(seed, index)
    spec, label = draw_spec(rng, None if split == "all" else split)
    return SynthObject(sample_id=object_id(index, seed), category=spec["category"], family=spec["family"],
                       split=label, caption=caption(spec, rng), plan=plan_text(spec), detail=detail_text(spec),
                       spec=spec, grid=build_grid(spec))


def generate_objects(n: int, seed: int, split: str = "all") -> list[SynthObject]:
    return [make_object(i, seed, split) for i in range(n)]
