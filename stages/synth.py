"""`rl3d synth`: the procedural shape world.

Coloured 32^3 voxel objects from parametric families (stages/shapes/), each with a caption, a
level-1 plan and a level-2 detail text (Hi-GRPO reasoning targets), its machine-readable spec,
mesh tokens and a GLB. Object i of seed s is drawn from its own generator seeded by (s, i), so
any subset (a shard) reproduces exactly the rows of the full run.

Split rule: rare compositions (held-out families and held-out family x attribute combinations,
category "rare_entities") are always "eval"; every other object is "train" with probability
TRAIN_FRACTION, decided by its own generator. `split="train"` draws only common objects and
labels them train; `split="eval"` draws from every category and labels them eval.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from rl3d.formats import shards as shards_io
from rl3d.formats import voxels as vox
from rl3d.formats.errors import InputError
from rl3d.stages.contract import StageOptions, run_stage, status_counts, timed
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


def _encode(grids: np.ndarray) -> tuple[list[list[int]], str]:
    """Mesh tokens with the shipped codec, or empty lists + "no codec" while none is available."""
    try:
        from rl3d.formats.codec import VoxelCodec

        codec = VoxelCodec.load()
    except (ImportError, FileNotFoundError):
        return [[] for _ in range(len(grids))], "no codec"
    if not len(grids):
        return [], ""
    return [list(map(int, t)) for t in codec.encode_batch(grids)], ""


def objects_table(objs: list[SynthObject], tokens: list[list[int]], mesh_paths: list[str],
                  statuses: list[str], messages: list[str]) -> pa.Table:
    from rl3d.formats.tables import SCHEMAS

    _, cols = SCHEMAS["objects"]
    data = {
        "sample_id": [o.sample_id for o in objs], "prompt_id": [o.sample_id for o in objs],
        "prompt": [o.caption for o in objs], "category": [o.category for o in objs],
        "family": [o.family for o in objs], "split": [o.split for o in objs],
        "spec": [json.dumps(o.spec, sort_keys=True) for o in objs], "plan": [o.plan for o in objs],
        "detail": [o.detail for o in objs], "voxels": [vox.to_bytes(o.grid) for o in objs],
        "mesh_tokens": tokens, "mesh_path": mesh_paths, "status": statuses, "message": messages,
    }
    return pa.table({k: pa.array(v, cols[k]) for k, v in data.items()})


def run_synth(n: int, seed: int, split: str, opts: StageOptions, meshes: bool = True) -> dict:
    if split not in SPLITS:
        raise InputError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    if n < 0:
        raise InputError(f"--n {n}: must be >= 0")
    config = {"stage": "synth", "n": n, "seed": seed, "split": split, "meshes": meshes}
    out = Path(opts.out)

    def produce(shard, progress):
        stats: dict = {}
        ids = [i for i in range(n) if shard.owns(object_id(i, seed))]
        with timed(stats, "generate_s"):
            objs = [make_object(i, seed, split) for i in progress.track(ids, len(ids), "synth objects")]
        with timed(stats, "encode_s"):
            tokens, codec_msg = _encode(np.stack([o.grid for o in objs]) if objs else np.zeros((0, 32, 32, 32), np.uint8))
        statuses, messages, paths = ["ok"] * len(objs), [codec_msg] * len(objs), [""] * len(objs)
        if meshes:
            from rl3d.formats.glb import write_glb

            with timed(stats, "glb_s"):
                for k, o in enumerate(progress.track(objs, len(objs), "synth meshes")):
                    rel = f"{shards_io.MESHES}/{o.sample_id}.glb"
                    try:
                        write_glb(vox.grid_to_mesh(o.grid), shards_io.inside(out, rel))
                        paths[k] = rel
                    except Exception as e:  # keep the row, say why it has no mesh
                        statuses[k], messages[k] = "mesh_error", f"{type(e).__name__}: {e}"
        table = objects_table(objs, tokens, paths, statuses, messages)
        stats["splits"] = {s: sum(o.split == s for o in objs) for s in ("train", "eval")}
        stats["status"] = status_counts(table)
        return table, stats

    return run_stage("synth", "objects", opts, config, produce)
