"""Rubric prompts for the VLM judge terms, and the strict parsers of the judges' replies.

Each rubric says whether it is judged per view (one request per rendered view, the stage
aggregates per_view) or jointly (one request with all selected views). Every rubric asks the
judge to reason briefly and then end with ONE final line in a fixed format; the parser reads
only that final line and rejects anything else (missing line, wrong keys, non-numbers, values
out of range). A reply that fails to parse raises JudgeParseError; the backend turns it into a
"parse_error" TermResult. There are no default scores.

The wording is ours; the terms follow the paper's judge rewards (docs/hi_grpo.md, "Rewards per level").
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Callable

SYSTEM = ("You are a strict, careful judge of 3D objects generated from text prompts. You see rendered "
          "views of one object. Judge only what is visible. Follow the output format exactly.")

_VIEWS_NOTE = ("The {n} images are renders of the SAME 3D object from different viewpoints around it "
               "(untextured renders may show flat colours).")
_ONE_VIEW_NOTE = "The image is a render of a generated 3D object from one viewpoint."

CATEGORY_MATCH = """{views_note}
Text prompt: "{prompt}"
{category_line}
Task: decide whether the object, judged from all views together, belongs to the category and
sub-category that the prompt asks for (for example, a prompt asking for an office chair is not
matched by a stool or a sofa). Shape, proportions and parts matter; colour alone does not.
Think in at most three sentences, then end your reply with exactly one final line:
MATCH: yes
or
MATCH: no"""

ALIGNMENT = """{views_note}
Text prompt: "{prompt}"
Task: rate how well the object in this view matches the prompt: the object type, its described
parts, their number and arrangement, colours and stated attributes.
Scale (integers only):
1 = unrelated to the prompt
2 = the right kind of object is barely recognisable; most described details are missing or wrong
3 = the right object, but several described details are missing or wrong
4 = the right object with at most one minor detail missing or wrong
5 = fully matches every described detail
Think step by step in at most five sentences, then end your reply with exactly one final line:
SCORE: <integer 1-5>"""

ALIGNMENT_LOGIC_STYLE = """{views_note}
Text prompt: "{prompt}"
Task: rate the object in this view on three criteria, each an integer from 1 (very poor) to 5 (excellent):
- alignment: does it match the prompt (object type, parts, counts, colours, attributes)?
- logic: is it physically and structurally plausible (parts attached where they belong, sensible
  proportions and symmetry, no floating or intersecting fragments, stands on its base)?
- style: is it visually coherent and pleasing (consistent colour scheme and level of detail, clean
  silhouette, matches any style the prompt names)?
Think briefly (at most five sentences), then end your reply with exactly one final line holding a
JSON object with these three integer keys, for example:
{{"alignment": 4, "logic": 3, "style": 5}}"""

APPEARANCE = """{views_note}
Text prompt: "{prompt}"
Task: judge the surface appearance of the object from all views together, each criterion a number
from 0.0 (very poor) to 1.0 (excellent):
- colour_smoothness: colours change smoothly and deliberately; no noisy speckles, stray voxels of
  the wrong colour or blotches.
- material: the colours and shading read as plausible materials for each part (wood, metal,
  fabric, glass, ...), consistent with the prompt.
- texture: surface detail is clean and consistent across views; no holes, seams or patchy regions.
Think briefly (at most five sentences), then end your reply with exactly one final line holding a
JSON object with these three keys, for example:
{{"colour_smoothness": 0.8, "material": 0.6, "texture": 0.7}}"""

PARTS = """{views_note}
Text prompt: "{prompt}"
Task: first list the components that the prompt names or clearly implies (for example "a red
table with four legs" -> tabletop, legs). Use at most 8 components. Then, looking at all views
together, judge each component:
- exists: 1 if the component is visibly present, else 0
- completeness: from 0.0 to 1.0, how complete and correctly formed it is (count, shape, colour);
  must be 0.0 when exists is 0
Think briefly, then end your reply with exactly one final line holding a JSON object, for example:
{{"components": [{{"name": "tabletop", "exists": 1, "completeness": 0.9}}, {{"name": "legs", "exists": 1, "completeness": 0.5}}]}}"""


class JudgeParseError(ValueError):
    """The judge's reply does not follow the rubric's output format."""


@dataclass(frozen=True)
class Rubric:
    name: str
    per_view: bool                     # True: one request per view; False: all views jointly
    template: str
    parse: Callable[[str], dict]       # reply -> {field: number}; raises JudgeParseError
    fields: tuple[str, ...]            # the parsed fields that combine into the value
    value_range: tuple[float, float]   # range of the combined value with unit weights (docs, checks)

    def user_text(self, prompt: str, n_views: int, category: str | None = None) -> str:
        views_note = _ONE_VIEW_NOTE if n_views == 1 else _VIEWS_NOTE.format(n=n_views)
        category_line = (f"Expected category: {category}" if category
                         else "Expected category: the category named by the prompt.")
        return self.template.format(views_note=views_note, prompt=prompt.strip().replace('"', "'"),
                                    category_line=category_line)


# ---- parsers ------------------------------------------------------------------------------------

_FENCE = re.compile(r"^`{3}\w*$")


def final_line(reply: str) -> str:
    """The reply's last non-empty line (a closing ``` fence around it is tolerated)."""
    lines = [ln.strip() for ln in reply.strip().splitlines() if ln.strip()]
    while lines and _FENCE.match(lines[-1]):
        lines.pop()
    if not lines:
        raise JudgeParseError("empty reply")
    return lines[-1]


def _final_json(reply: str) -> dict:
    line = final_line(reply)
    if not (line.startswith("{") and line.endswith("}")):
        raise JudgeParseError("final line is not a JSON object")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise JudgeParseError(f"final line is not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise JudgeParseError("final line is not a JSON object")
    return obj


def _number(obj: dict, key: str, lo: float, hi: float, integer: bool) -> float:
    if key not in obj:
        raise JudgeParseError(f"missing key {key!r}")
    v = obj[key]
    # bool is an int subclass in Python; a judge writing true/false has not given a score
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise JudgeParseError(f"{key} is not a number: {v!r}")
    if integer and v != int(v):
        raise JudgeParseError(f"{key} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise JudgeParseError(f"{key}={v!r} is outside [{lo:g}, {hi:g}]")
    return float(v)


def _exact_keys(obj: dict, keys: tuple[str, ...]) -> None:
    if set(obj) != set(keys):
        raise JudgeParseError(f"expected keys {sorted(keys)}, got {sorted(obj)}")


_MATCH = re.compile(r"^MATCH:\s*(yes|no)\.?$", re.IGNORECASE)
_SCORE = re.compile(r"^SCORE:\s*(\S+)$")


def parse_category_match(reply: str) -> dict:
    m = _MATCH.match(final_line(reply))
    if not m:
        raise JudgeParseError("final line is not 'MATCH: yes' or 'MATCH: no'")
    return {"match": 1.0 if m.group(1).lower() == "yes" else 0.0}


def parse_alignment(reply: str) -> dict:
    m = _SCORE.match(final_line(reply))
    if not m or not re.fullmatch(r"[0-9]+", m.group(1)):
        raise JudgeParseError("final line is not 'SCORE: <integer 1-5>'")
    score = int(m.group(1))
    if not 1 <= score <= 5:
        raise JudgeParseError(f"score {score} is outside [1, 5]")
    return {"alignment": float(score)}


_ALS_KEYS = ("alignment", "logic", "style")
_APPEARANCE_KEYS = ("colour_smoothness", "material", "texture")


def parse_alignment_logic_style(reply: str) -> dict:
    obj = _final_json(reply)
    _exact_keys(obj, _ALS_KEYS)
    return {k: _number(obj, k, 1, 5, integer=True) for k in _ALS_KEYS}


def parse_appearance(reply: str) -> dict:
    obj = _final_json(reply)
    _exact_keys(obj, _APPEARANCE_KEYS)
    return {k: _number(obj, k, 0, 1, integer=False) for k in _APPEARANCE_KEYS}


MAX_COMPONENTS = 16


def parse_parts(reply: str) -> dict:
    """-> {"parts": mean over components of (exists + completeness), in [0, 2], "components": [...]}."""
    obj = _final_json(reply)
    _exact_keys(obj, ("components",))
    comps = obj["components"]
    if not isinstance(comps, list) or not comps:
        raise JudgeParseError("components must be a non-empty list")
    if len(comps) > MAX_COMPONENTS:
        raise JudgeParseError(f"{len(comps)} components (more than {MAX_COMPONENTS})")
    parsed = []
    for i, c in enumerate(comps):
        if not isinstance(c, dict):
            raise JudgeParseError(f"component {i} is not an object")
        name = c.get("name")
        if not isinstance(name, str) or not name.strip():
            raise JudgeParseError(f"component {i} has no name")
        try:
            _exact_keys(c, ("name", "exists", "completeness"))
            exists = _number(c, "exists", 0, 1, integer=True)
            completeness = _number(c, "completeness", 0, 1, integer=False)
        except JudgeParseError as e:
            raise JudgeParseError(f"component {name!r}: {e}") from None
        if exists == 0 and completeness > 0:
            raise JudgeParseError(f"component {name!r}: completeness {completeness:g} for a missing part")
        parsed.append({"name": name.strip(), "exists": exists, "completeness": completeness})
    score = sum(c["exists"] + c["completeness"] for c in parsed) / len(parsed)
    return {"parts": score, "components": parsed}


RUBRICS: dict[str, Rubric] = {
    r.name: r for r in (
        Rubric("category_match", False, CATEGORY_MATCH, parse_category_match, ("match",), (0, 1)),
        Rubric("alignment", True, ALIGNMENT, parse_alignment, ("alignment",), (1, 5)),
        Rubric("alignment_logic_style", True, ALIGNMENT_LOGIC_STYLE, parse_alignment_logic_style,
               _ALS_KEYS, (3, 15)),
        Rubric("appearance", False, APPEARANCE, parse_appearance, _APPEARANCE_KEYS, (0, 3)),
        Rubric("parts", False, PARTS, parse_parts, ("parts",), (0, 2)),
    )
}


def get_rubric(name: str) -> Rubric:
    try:
        return RUBRICS[name]
    except KeyError:
        raise KeyError(f"unknown judge rubric {name!r}; choose from {sorted(RUBRICS)}") from None
