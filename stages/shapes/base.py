"""Building blocks of the procedural shape world: a labelled voxel canvas, the Family interface,
colour sampling and caption phrasing helpers.

Every family is a pure function of its spec: `sample(rng)` draws the spec (counts, proportions,
per-part colours, style), `build(spec)` draws the voxels with no randomness, so the spec checker
can rebuild a reference object from a spec alone.
"""
from __future__ import annotations

import numpy as np

from rl3d.formats.voxels import COLOR_INDEX, RESOLUTION, color_id

R = RESOLUTION
C = (R - 1) / 2.0  # 15.5: the x/z centre of the grid, between voxels 15 and 16
_I = np.arange(R, dtype=np.float32)
_X, _Y, _Z = np.meshgrid(_I, _I, _I, indexing="ij")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")

# shared colour pools: "natural" choices for parts; rare combinations draw outside them
BRIGHT = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "cyan", "teal", "navy", "gold")
WOODS = ("brown", "beige", "black", "gray", "white")
ALL_COLORS = tuple(COLOR_INDEX)


class Canvas:
    """A grid of part labels; part k (1-based) is painted with colours[k]."""

    def __init__(self, colors: dict[str, str]):
        self.labels = np.zeros((R, R, R), np.uint8)
        self.parts: list[str] = []
        self.colors = colors

    def _id(self, part: str) -> int:
        if part not in self.parts:
            self.parts.append(part)
        return self.parts.index(part) + 1

    def paint(self, part: str, mask: np.ndarray) -> None:
        self.labels[mask] = self._id(part)

    def erase(self, mask: np.ndarray) -> None:
        self.labels[mask] = 0

    def recolor(self, part: str, mask: np.ndarray) -> None:
        """Relabel already-filled voxels inside mask (paint without changing the geometry)."""
        self.labels[mask & (self.labels > 0)] = self._id(part)

    def region(self, x0=0, x1=R, y0=0, y1=R, z0=0, z1=R) -> np.ndarray:
        m = np.zeros((R, R, R), bool)
        m[max(0, int(x0)):int(x1), max(0, int(y0)):int(y1), max(0, int(z0)):int(z1)] = True
        return m

    def box(self, part: str, x0, x1, y0, y1, z0, z1) -> None:
        """Fill [x0,x1) x [y0,y1) x [z0,z1), clipped to the grid (integer bounds)."""
        sl = tuple(slice(max(0, int(a)), min(R, int(b))) for a, b in ((x0, x1), (y0, y1), (z0, z1)))
        self.labels[sl] = self._id(part)

    def cbox(self, part: str, wx, y0, y1, wz, cx=C, cz=C) -> None:
        """Box of widths wx, wz centred on (cx, cz)."""
        x0, z0 = int(np.floor(cx - wx / 2 + 1.0)), int(np.floor(cz - wz / 2 + 1.0))  # no half-to-even
        self.box(part, x0, x0 + wx, y0, y1, z0, z0 + wz)

    def cyl_y(self, part: str, r, y0, y1, cx=C, cz=C, inner=None, r_top=None) -> None:
        """Vertical (truncated-cone) cylinder; `inner` leaves a hollow core of that radius."""
        y0, y1 = max(0, int(y0)), min(R, int(y1))
        if y1 <= y0:
            return
        d2 = (_X[:, 0, :] - cx) ** 2 + (_Z[:, 0, :] - cz) ** 2
        for y in range(y0, y1):  # per-layer radius: y1 - y0 <= 32 layers, each a vectorised disc
            t = 0.0 if y1 - y0 <= 1 else (y - y0) / (y1 - y0 - 1)
            rr = r if r_top is None else r + (r_top - r) * t
            m = d2 <= (rr + 0.25) ** 2
            if inner is not None:
                m &= d2 > (inner + 0.25) ** 2
            self.labels[:, y, :][m] = self._id(part)

    def cyl_z(self, part: str, r, z0, z1, cx=C, cy=C, inner=None) -> None:
        """Disc in the x-y plane extruded along z (wheels, handles)."""
        d2 = (_X[:, :, 0] - cx) ** 2 + (_Y[:, :, 0] - cy) ** 2
        m = d2 <= (r + 0.25) ** 2
        if inner is not None:
            m &= d2 > (inner + 0.25) ** 2
        z0, z1 = max(0, int(z0)), min(R, int(z1))
        self.labels[:, :, z0:z1][m] = self._id(part)

    def cyl_x(self, part: str, r, x0, x1, cy, cz=C, inner=None) -> None:
        """Disc in the y-z plane extruded along x."""
        d2 = (_Y[0] - cy) ** 2 + (_Z[0] - cz) ** 2
        m = d2 <= (r + 0.25) ** 2
        if inner is not None:
            m &= d2 > (inner + 0.25) ** 2
        x0, x1 = max(0, int(x0)), min(R, int(x1))
        self.labels[x0:x1][:, m] = self._id(part)

    def ellipsoid(self, part: str, cx, cy, cz, rx, ry, rz, y_min=None, inner=None) -> None:
        d = ((_X - cx) / rx) ** 2 + ((_Y - cy) / ry) ** 2 + ((_Z - cz) / rz) ** 2
        m = d <= 1.0 + 0.5 / max(rx, ry, rz)
        if inner is not None:  # hollow shell: inner is the wall thickness in voxels
            di = ((_X - cx) / (rx - inner)) ** 2 + ((_Y - cy) / (ry - inner)) ** 2 + ((_Z - cz) / (rz - inner)) ** 2
            m &= di > 1.0
        if y_min is not None:
            m &= _Y >= y_min
        self.paint(part, m)

    def sphere(self, part: str, cx, cy, cz, r, **kw) -> None:
        self.ellipsoid(part, cx, cy, cz, r, r, r, **kw)

    def rod(self, part: str, p0, p1, thick: int = 1) -> None:
        """A straight rod of thick^3 cross-section between two points (inclusive)."""
        p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
        n = int(np.abs(p1 - p0).max()) * 2 + 1
        pts = np.round(p0[None] + (p1 - p0)[None] * np.linspace(0, 1, n)[:, None]).astype(int)
        offs = np.stack(np.meshgrid(*[np.arange(thick)] * 3, indexing="ij"), -1).reshape(-1, 3)
        pts = (pts[:, None, :] + offs[None]).reshape(-1, 3)
        pts = pts[((pts >= 0) & (pts < R)).all(1)]
        self.labels[tuple(pts.T)] = self._id(part)

    def grid(self) -> np.ndarray:
        lut = np.zeros(len(self.parts) + 1, np.uint8)
        for k, p in enumerate(self.parts, 1):
            lut[k] = color_id(self.colors[p])
        return lut[self.labels]

    def part_masks(self) -> dict[str, np.ndarray]:
        return {p: self.labels == k for k, p in enumerate(self.parts, 1)}


def pick_colors(rng: np.random.Generator, pools: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """One colour per part, all different (so each part's colour is checkable on its own)."""
    used: set[str] = set()
    out = {}
    for part, pool in pools.items():
        choices = [c for c in pool if c not in used] or [c for c in ALL_COLORS if c not in used]
        out[part] = str(rng.choice(choices))
        used.add(out[part])
    return out


def num(n: int, rng: np.random.Generator | None = None) -> str:
    """A count as a word or (sometimes) digits: captions vary, the parser reads both."""
    if rng is not None and rng.random() < 0.3:
        return str(n)
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def plural(n: int, word: str, rng=None) -> str:
    return f"{num(n, rng)} {word}" + ("" if n == 1 else ("es" if word.endswith(("sh", "x", "ch")) else "s"))


def choose(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


class Family:
    """One object family. Subclasses set the class attributes and implement sample/build/phrases."""

    name = ""
    category = ""
    nouns: tuple[str, ...] = ()            # caption nouns; nouns[0] is canonical
    parts: dict[str, tuple[str, ...]] = {}  # part -> colour pool for train objects
    part_words: dict[str, tuple[str, ...]] = {}  # part -> words a prompt uses for it
    main_part = ""                          # the part "a red chair" colours
    counts: dict[str, tuple[str, ...]] = {}  # count param -> count nouns ("legs")
    flags: dict[str, tuple[str, ...]] = {}   # boolean param -> words ("backrest")
    article_counts: tuple[str, ...] = ()     # counts where "a <word>" means one ("a handle")
    held_out = False                        # whole family only in eval (rare_entities)

    # --- spec -------------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator, rare: bool = False) -> dict:
        """Draw a spec. rare=True draws a held-out attribute combination (see is_rare)."""
        for _ in range(100):
            params, colors, style = self.sample_params(rng, rare)
            spec = {"family": self.name, "category": self.category, "params": params,
                    "colors": colors, "style": style}
            if self.held_out or self.is_rare(spec) == rare:
                return spec
        raise RuntimeError(f"{self.name}: could not sample a {'rare' if rare else 'common'} spec")

    def sample_params(self, rng, rare: bool) -> tuple[dict, dict, dict]:
        raise NotImplementedError

    def is_rare(self, spec: dict) -> bool:
        """Held-out family x attribute combinations: never in train."""
        return False

    def has_rare(self) -> bool:
        return False

    def defaults(self) -> dict:
        """Canonical params used when a spec (e.g. parsed from a prompt) leaves some out."""
        return self.sample(np.random.default_rng(0))["params"]

    def full_params(self, spec: dict) -> dict:
        return {**self.defaults(), **(spec.get("params") or {})}

    # --- geometry ---------------------------------------------------------------------------
    def build(self, spec: dict) -> Canvas:
        raise NotImplementedError

    def probes(self) -> dict:
        """count/flag param -> probe(occupancy bool[32,32,32]) -> observed value."""
        return {}

    # --- text -------------------------------------------------------------------------------
    def subject(self, spec: dict, rng) -> str:
        """The caption's noun phrase, e.g. 'a red chair'."""
        noun = choose(rng, self.nouns)
        col = spec["colors"].get(self.main_part)
        return f"{article(col)} {col} {noun}" if col else f"{article(noun)} {noun}"

    def features(self, spec: dict, rng) -> list[str]:
        """Caption phrases beyond the main colour, e.g. ['four brown legs', 'a red backrest']."""
        return []

    def plan(self, spec: dict) -> str:
        raise NotImplementedError

    def detail(self, spec: dict) -> str:
        raise NotImplementedError
