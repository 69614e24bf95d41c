"""Benchmarks for `rl3d eval`: the two shipped with rl3d and a loader for user benchmark files.

- `synth-reasoning`: procedural prompts of the synth "eval" split, PER_CATEGORY per category, each
  with its machine-readable spec and its ground-truth grid (rebuilt from the spec, so reference
  renders and spec checks need no stored data). Drawn deterministically at load time from
  rl3d.stages.shapes.world with SYNTH_SEED; the content hash recorded in the report says exactly which
  prompt set was used.
- `text-reasoning`: 252 free-text, reasoning-heavy prompts written for rl3d (counts, spatial
  relations, affordances, plausibility, rare objects, styles) in the six categories; no specs,
  no references (scored by CLIP-family models; KD/FD need --references).
- a user file (.csv, .json, .jsonl, .parquet, .txt): columns `prompt` (required), `prompt_id`,
  `category` and `reference_dir` (a folder of reference renders of that object, relative to the
  file) optional; e.g. an MME-3DR or Toys4K list.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rl3d.formats.errors import InputError
from rl3d.formats.prompts import read_prompts
from rl3d.stages.shapes import world

CATEGORIES = ("spatial_structural", "mechanical_affordance", "physical_plausibility", "organic_forms",
              "rare_entities", "stylized_abstract")
SHIPPED = ("synth-reasoning", "text-reasoning")
SYNTH_SEED = 31_337
PER_CATEGORY = 40
UNCATEGORIZED = "uncategorized"
REFERENCE_COLUMNS = ("reference_dir", "references", "reference_renders")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Benchmark:
    name: str
    source: str                       # where the prompts came from (file path or generator + seed)
    prompts: list[dict]               # prompt_id, prompt, category [, spec (JSON str), family, reference_dir]
    has_specs: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def categories(self) -> list[str]:
        seen = []
        for r in self.prompts:
            if r["category"] not in seen:
                seen.append(r["category"])
        return seen

    def content_hash(self) -> str:
        keys = ("prompt_id", "prompt", "category", "spec")
        blob = json.dumps([[r.get(k) for k in keys] for r in self.prompts], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def limited(self, per_category: int | None) -> "Benchmark":
        """The first N prompts of each category (file order), for quick runs."""
        if per_category is None:
            return self
        if per_category < 1:
            raise InputError(f"--limit {per_category}: must be >= 1")
        counts: dict[str, int] = {}
        keep = []
        for r in self.prompts:
            if counts.get(r["category"], 0) < per_category:
                counts[r["category"]] = counts.get(r["category"], 0) + 1
                keep.append(r)
        return Benchmark(self.name, self.source, keep, self.has_specs,
                         self.notes + [f"limited to the first {per_category} prompts per category"])

    def reference_grid(self, prompt_row: dict):
        """The ground-truth voxel grid of a synth prompt (None for benchmarks without specs)."""
        if not prompt_row.get("spec"):
            return None
        return world.build_grid(json.loads(prompt_row["spec"]))


def list_benchmarks() -> list[str]:
    return list(SHIPPED)


def load_benchmark(name_or_path: str | os.PathLike, limit: int | None = None) -> Benchmark:
    """A shipped benchmark by name or a user benchmark file -> Benchmark (optionally limited)."""
    key = str(name_or_path)
    if key == "synth-reasoning":
        bench = synth_reasoning()
    elif key == "text-reasoning":
        bench = text_reasoning()
    else:
        p = Path(key)
        if not p.exists():
            raise InputError(f"--bench {key!r}: not a shipped benchmark ({', '.join(SHIPPED)}) "
                             f"and no such file")
        bench = load_benchmark_file(p)
    return bench.limited(limit)


def _data_file(name: str) -> Path:
    return Path(__file__).with_name(name)


def text_reasoning() -> Benchmark:
    path = _data_file("text_reasoning.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return Benchmark("text-reasoning", str(path), rows, has_specs=False)


def synth_reasoning(per_category: int = PER_CATEGORY, seed: int = SYNTH_SEED, max_draws: int = 20_000) -> Benchmark:
    """PER_CATEGORY eval-split synth objects per category, in draw order (deterministic).

    Draws stop when every category is full, or when all categories seen so far are full and the
    last 1000 draws found no new one (a synth world without some category: the report says so)."""
    by_cat: dict[str, list[dict]] = {}
    last_new = 0
    for i in range(max_draws):
        o = world.make_object(i, seed, "eval")
        rows = by_cat.setdefault(o.category, [])
        if not rows and i:
            last_new = i
        if len(rows) < per_category:
            rows.append({"prompt_id": o.sample_id, "prompt": o.caption, "category": o.category,
                         "family": o.family, "spec": json.dumps(o.spec, sort_keys=True)})
        full = all(len(v) >= per_category for v in by_cat.values())
        if full and (len(by_cat) == len(CATEGORIES) or i - last_new >= 1000):
            break
    order = [c for c in CATEGORIES if c in by_cat] + sorted(set(by_cat) - set(CATEGORIES))
    prompts = [r for c in order for r in by_cat[c]]
    missing = [c for c in CATEGORIES if c not in by_cat]
    notes = [f"synth world has no objects in: {', '.join(missing)}"] if missing else []
    return Benchmark("synth-reasoning", f"rl3d.stages.synth eval split, seed {seed}", prompts, True, notes)


def load_benchmark_file(path: str | os.PathLike) -> Benchmark:
    """A user benchmark: any prompt file formats.prompts reads (.txt/.jsonl/.json/.csv/.parquet, a
    saved Hugging Face dataset folder). Missing category -> "uncategorized"
    (said in the report); a reference_dir must exist and hold images."""
    p = Path(path)
    rows = _read_rows(p, str(p))  # one reader for every format: formats.prompts validates rows and ids
    notes = []
    if any(r["category"] is None for r in rows):
        notes.append(f"{sum(r['category'] is None for r in rows)} prompts without a category are "
                     f"grouped as {UNCATEGORIZED!r}")
    for n, r in enumerate(rows, 1):
        r["category"] = r["category"] or UNCATEGORIZED
        ref = next((r.pop(c) for c in REFERENCE_COLUMNS if r.get(c)), None)
        for c in REFERENCE_COLUMNS:
            r.pop(c, None)
        if ref:
            d = Path(ref) if os.path.isabs(ref) else (p.parent / ref)
            if not d.is_dir():
                raise InputError(f"{p}: row {n}: reference_dir {ref!r} is not a directory")
            if not reference_images(d):
                raise InputError(f"{p}: row {n}: reference_dir {ref!r} holds no images")
            r["reference_dir"] = str(d.resolve())
    has_specs = all(r.get("spec") for r in rows)
    return Benchmark(p.stem, str(p.resolve()), rows, has_specs, notes)


def _read_rows(path: Path, source: str) -> list[dict]:
    try:
        t = read_prompts(path)
    except InputError as e:
        raise InputError(str(e).replace(str(path), source)) from None
    return t.to_pylist()


def reference_images(d: str | os.PathLike) -> list[str]:
    """Image files of a reference folder, sorted by name."""
    return sorted(str(f) for f in Path(d).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
                  and not f.name.startswith("."))  # hidden .tmp-* files: writes a kill interrupted
