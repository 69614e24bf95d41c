"""Spec checker: does a voxel grid satisfy a shape-world spec, attribute by attribute?

`check_spec(spec, grid)` runs one check per attribute the spec states (family silhouette, counts
read back by the family's probes, per-part colours in the part's height band, hollowness,
wireframe, stability, grounded, no floating parts) and scores the fraction passed.
`parse_prompt(text)` recovers a (partial) spec from a prompt phrased in the synth grammar, or
None outside it. `SpecBackend` is the reward backend "spec".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from rl3d.formats.errors import InputError
from rl3d.formats.voxels import COLOR_INDEX, PALETTE_NAMES, RESOLUTION
from rl3d.stages.checks.check import Check, passed
from rl3d.stages.rewards.base import RewardBackend, RewardItem, TermResult
from rl3d.stages.shapes import FAMILIES
from rl3d.stages.shapes import probes
from rl3d.stages.shapes.base import NUMBER_WORDS

# colour share of a part's height band must reach this fraction of the reference share
COLOR_SHARE = 0.4
HOLLOW_MIN = 0.25
SILHOUETTE_PAD = 0.25   # relative padding of the family's aspect/fill ranges


@dataclass
class SpecResult:
    score: float
    checks: list[dict] = field(default_factory=list)


def _check(attribute: str, expected, observed, passed: bool) -> dict:
    return {"attribute": attribute, "expected": expected, "observed": observed, "passed": bool(passed)}


def _aspect_fill(occ: np.ndarray) -> tuple[float, float]:
    idx = np.argwhere(occ)
    ext = idx.max(0) - idx.min(0) + 1
    return float(ext[1] / max(ext[0], ext[2])), float(len(idx) / np.prod(ext))


@lru_cache(maxsize=None)
def silhouette_range(family: str) -> tuple[float, float, float, float]:
    """(aspect lo, hi, fill lo, hi) over the family's own parameter space (64 fixed draws, padded)."""
    fam = FAMILIES[family]
    rng = np.random.default_rng(12345)
    vals = []
    for k in range(64):
        spec = fam.sample(rng, rare=bool(k % 4 == 3 and fam.has_rare()))
        occ = fam.build(spec).labels > 0
        vals.append(_aspect_fill(occ))
    a = np.array(vals)
    lo, hi = a.min(0), a.max(0)
    return (lo[0] * (1 - SILHOUETTE_PAD), hi[0] * (1 + SILHOUETTE_PAD),
            lo[1] * (1 - SILHOUETTE_PAD) - 0.02, min(1.0, hi[1] * (1 + SILHOUETTE_PAD) + 0.02))


def _reference(spec: dict):
    """The reference object of a (possibly partial) spec: missing params and colours filled in."""
    fam = FAMILIES[spec["family"]]
    params = fam.full_params(spec)
    colors = dict(spec.get("colors") or {})
    spare = [c for c in PALETTE_NAMES if c not in colors.values()]
    for part in fam.parts:
        if part not in colors:
            colors[part] = spare.pop(0)
    ref = {**spec, "params": params, "colors": colors}
    return fam.build(ref)


def _color_check(part: str, color: str, ref_masks: dict, ref_occ: np.ndarray, grid: np.ndarray) -> dict:
    """The part's colour covers its share of the part's height band (bands scale with the object)."""
    mask = ref_masks.get(part)
    if color not in COLOR_INDEX:
        return _check(f"color.{part}", color, "unknown colour name", False)
    if mask is None or not mask.any():  # the part is not drawn for these params: just present anywhere
        present = bool((grid == COLOR_INDEX[color]).any())
        return _check(f"color.{part}", color, "present" if present else "absent", present)
    ry0, ry1 = probes.y_extent(ref_occ)
    py = np.flatnonzero(mask.any((0, 2)))
    # the part's height band, padded by 10% of the object height, in object-relative units
    lo, hi = (py[0] - ry0) / (ry1 - ry0) - 0.1, (py[-1] + 1 - ry0) / (ry1 - ry0) + 0.1

    def band(y0, y1):
        h = y1 - y0
        return slice(max(y0, y0 + int(np.floor(lo * h))), min(y1, y0 + int(np.ceil(hi * h))))

    rb = band(ry0, ry1)
    ref_share = float(mask[:, rb].sum() / max(1, ref_occ[:, rb].sum()))
    obs = grid[:, band(*probes.y_extent(grid > 0))]
    share = float((obs == COLOR_INDEX[color]).sum() / max(1, (obs > 0).sum()))
    passed = share >= COLOR_SHARE * ref_share and share > 0
    return _check(f"color.{part}", color, f"{share:.2f} of band (reference {ref_share:.2f})", passed)


def check_spec(spec: dict, grid: np.ndarray) -> SpecResult:
    fam = FAMILIES.get(spec.get("family", ""))
    if fam is None:
        raise ValueError(f"unknown family {spec.get('family')!r}")
    grid = np.asarray(grid)
    occ = grid > 0
    checks = [_check("nonempty", True, int(occ.sum()), occ.any())]
    if not occ.any():
        return SpecResult(0.0, checks)
    checks.append(_check("grounded", True, bool(occ[:, 0, :].any()), occ[:, 0, :].any()))
    n_float = probes.floating_parts(occ)
    checks.append(_check("no_floating_parts", 0, n_float, n_float == 0))
    a_lo, a_hi, f_lo, f_hi = silhouette_range(fam.name)
    aspect, fill = _aspect_fill(occ)
    checks.append(_check("silhouette", f"height/width {a_lo:.2f}-{a_hi:.2f}, fill {f_lo:.2f}-{f_hi:.2f}",
                         f"height/width {aspect:.2f}, fill {fill:.2f}",
                         a_lo <= aspect <= a_hi and f_lo <= fill <= f_hi))
    params = spec.get("params") or {}
    for key, probe in fam.probes().items():
        if key in params:
            got = probe(occ)
            got = bool(got) if isinstance(params[key], bool) else int(got)
            checks.append(_check(key, params[key], got, got == params[key]))
    colors = spec.get("colors") or {}
    if colors:
        ref = _reference(spec)
        ref_occ, masks = ref.labels > 0, ref.part_masks()
        for part, color in sorted(colors.items()):
            checks.append(_color_check(part, color, masks, ref_occ, grid))
    style = spec.get("style") or {}
    if style.get("hollow"):
        hv = probes.hollowness(occ)
        checks.append(_check("hollow", True, round(hv, 3), hv >= HOLLOW_MIN))
    if style.get("wireframe"):
        thin = probes.thin_rods(occ)
        checks.append(_check("wireframe", True, thin, thin))
    stable = probes.center_over_footprint(occ) and (not style.get("stable") or probes.stable_cuts(occ))
    checks.append(_check("stable", True, stable, stable))
    score = sum(c["passed"] for c in checks) / len(checks)
    return SpecResult(float(score), checks)


# --- prompts in the synth grammar ---------------------------------------------------------------
_NUM = {w: i for i, w in enumerate(NUMBER_WORDS)}
_NUM_RE = r"(\d+|" + "|".join(NUMBER_WORDS) + r")"
_TOKEN = re.compile(r"[a-z0-9]+")


def _forms(word: str) -> list[str]:
    w = word.lower()
    out = {w, w + "s", w + "es"}
    if w.endswith("y"):
        out.add(w[:-1] + "ies")
    if w.endswith("f"):
        out.add(w[:-1] + "ves")
    if w.endswith("lf"):
        out.add(w[:-1] + "ves")
    return sorted(out, key=len, reverse=True)


def _family_patterns() -> list[tuple[re.Pattern, str]]:
    """(regex, family), most specific first: longer nouns before shorter ones."""
    pats = [(r"\b(stack|pile|tower) of (\w+ ){0,2}(planks?|boards?|slabs?)\b", "balanced_stack"),
            (r"\b(stack|pile|tower) of (\w+ ){0,2}(blocks?|box(es)?|cubes?)\b", "stack"),
            (r"\bwire ?frame\b|\bwire model\b|\brod frame\b", "wireframe"),
            (r"\bhollow (\w+ )?(sphere|box|cylinder|dome|shape|object)\b|\bshell\b", "hollow_shell")]
    nouns = []
    for name, fam in FAMILIES.items():
        for n in fam.nouns:
            nouns.append((n, name))
    nouns.sort(key=lambda t: -len(t[0]))
    for n, name in nouns:
        pats.append((r"\b" + "(" + "|".join(re.escape(f) for f in _forms(n.split()[-1])) + ")\\b"
                     if " " not in n else r"\b" + re.escape(n) + r"(s|es)?\b", name))
    return [(re.compile(p), name) for p, name in pats]


_PATTERNS: list | None = None


def _detect_family(text: str) -> str | None:
    global _PATTERNS
    if _PATTERNS is None:
        _PATTERNS = _family_patterns()
    best = None
    for pat, name in _PATTERNS:
        m = pat.search(text)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), name)
    return best[1] if best else None


def _word_map(fam) -> tuple[dict, set]:
    parts: dict[str, str] = {}
    for part, words in fam.part_words.items():
        for phrase in words:
            for f in _forms(phrase.split()[-1]):
                parts.setdefault(f, part)
    nouns = {f for n in fam.nouns for f in _forms(n.split()[-1])}
    return parts, nouns


def _parse_counts(fam, text: str) -> dict:
    out = {}
    for key, words in fam.counts.items():
        alts = "|".join(re.escape(f) for w in words for f in _forms(w))
        m = re.search(_NUM_RE + r"\s+(?:[a-z]+\s+){0,2}?(?:" + alts + r")\b", text)
        if m:
            v = m.group(1)
            out[key] = int(v) if v.isdigit() else _NUM[v]
        elif re.search(r"\b(no|zero|without)\s+(an?\s+)?(?:" + alts + r")\b", text):
            out[key] = 0
        elif key in fam.article_counts and re.search(
                r"\ban?\s+(?:[a-z]+\s+){0,2}?(?:" + "|".join(map(re.escape, words)) + r")\b", text):
            out[key] = 1
    return out


def _parse_flags(fam, text: str) -> dict:
    out = {}
    for key, words in fam.flags.items():
        alts = "|".join(re.escape(f) for w in words for f in _forms(w))
        if re.search(r"\b(no|without)\s+(an?\s+)?(?:" + alts + r")\b", text):
            out[key] = False
        elif re.search(r"\b(?:" + alts + r")\b", text):
            out[key] = True
    return out


def _parse_colors(fam, tokens: list[str]) -> dict:
    parts, nouns = _word_map(fam)
    out: dict[str, str] = {}
    fallback = []
    for i, t in enumerate(tokens):
        if t not in COLOR_INDEX:
            continue
        part = None
        for nxt in tokens[i + 1:i + 4]:  # "red seat", "four brown legs", "red top plank"
            if nxt in COLOR_INDEX:
                break
            if nxt in parts:
                part = parts[nxt]
                break
            if nxt in nouns:
                part = fam.main_part
                break
        if part is None:  # "legs in purple", "the seat is red"
            for prev in reversed(tokens[max(0, i - 3):i]):
                if prev in parts and tokens[i - 1] in ("in", "is", "are", "coloured", "colored"):
                    part = parts[prev]
                    break
        if part is None:
            fallback.append(t)
        elif part not in out:
            out[part] = t
    if fallback and fam.main_part not in out:
        out[fam.main_part] = fallback[0]
    return out


def parse_prompt(text: str) -> dict | None:
    """A spec (family, category, counts, flags, colours) from a synth-grammar prompt, else None."""
    if not text:
        return None
    t = text.lower()
    name = _detect_family(t)
    if name is None:
        return None
    fam = FAMILIES[name]
    params = {**_parse_counts(fam, t), **_parse_flags(fam, t)}
    colors = _parse_colors(fam, _TOKEN.findall(t))
    style = dict(fam.sample(np.random.default_rng(0))["style"])
    return {"family": name, "category": fam.category, "params": params, "colors": colors, "style": style}


SPEC_SCORES = ("fraction", "all")


class SpecBackend(RewardBackend):
    """Reward term "spec": fraction of the spec's attribute checks the decoded grid passes, or with
    option score = "all", 1 when every check passes and 0 otherwise (a bonus that pays only for
    getting everything right, which the fraction dilutes: one failed check of 8 costs 0.125)."""

    name = "spec"
    needs_views = False
    host_workers = True  # the spec checks on the grid: worth spreading over processes

    @classmethod
    def doctor(cls, options: dict, label: str, unset: dict[str, list[str]], timeout: float) -> list[Check]:
        return [passed(label, "no model needed")]

    def __init__(self, parse: bool = True, score: str = "fraction"):
        if score not in SPEC_SCORES:
            raise InputError(f"spec option score must be one of {', '.join(SPEC_SCORES)}, not {score!r}")
        self.parse = bool(parse)  # fall back to parse_prompt when the item carries no spec
        self.all_or_nothing = score == "all"

    def score(self, items: list[RewardItem]) -> list[TermResult]:
        out = []
        for it in items:
            spec = it.spec or (parse_prompt(it.prompt) if self.parse else None)
            if not spec or spec.get("family") not in FAMILIES:
                out.append(TermResult(status="not_applicable", message="prompt outside the synth grammar"))
                continue
            if it.grid is None:
                out.append(TermResult(status="decode_error", message="no voxel grid to check"))
                continue
            if np.asarray(it.grid).shape != (RESOLUTION,) * 3:  # e.g. the VQ-VAE's uncoloured 64^3 occupancy
                out.append(TermResult(status="not_applicable", message=f"spec checks need a {RESOLUTION}^3 palette "
                                      f"grid; this shape is {'x'.join(map(str, np.asarray(it.grid).shape))} occupancy"))
                continue
            res = check_spec(spec, np.asarray(it.grid))
            value = float(all(c["passed"] for c in res.checks)) if self.all_or_nothing else res.score
            out.append(TermResult(value=value, details={"checks": res.checks, "family": spec["family"]}))
        return out
