"""mechanical_affordance: objects whose parts say how they are used (sit, put, hold, roll)."""
from __future__ import annotations

import numpy as np

from rl3d.stages.shapes import probes
from rl3d.stages.shapes.base import BRIGHT, C, R, WOODS, Canvas, Family, choose, num, pick_colors, plural

CAT = "mechanical_affordance"


def _leg_positions(n: int, wx: int, wz: int, round_top: bool, inset: float) -> list[tuple[float, float]]:
    if round_top or n in (3, 5):
        r = min(wx, wz) / 2 - inset
        a = np.pi / 2 + 2 * np.pi * np.arange(n) / n
        return [(C + r * np.cos(t), C + r * np.sin(t)) for t in a]
    hx, hz = wx / 2 - inset, wz / 2 - inset
    pts = [(C - hx, C - hz), (C + hx, C - hz), (C - hx, C + hz), (C + hx, C + hz)]
    if n == 6:
        pts += [(C, C - hz), (C, C + hz)]
    return pts


class Table(Family):
    name, category = "table", CAT
    nouns = ("table", "desk", "dining table")
    parts = {"top": WOODS + BRIGHT, "legs": WOODS + BRIGHT}
    part_words = {"top": ("top", "tabletop", "surface"), "legs": ("legs", "leg")}
    main_part = "top"
    counts = {"legs": ("leg",)}

    def sample_params(self, rng, rare):
        legs = 5 if rare else int(choose(rng, (3, 4, 4, 6)))
        round_top = legs in (3, 5) or (legs == 4 and rng.random() < 0.3)
        wx = int(rng.integers(22, 31)) if legs != 6 else int(rng.integers(27, 31))
        wz = wx if round_top else int(rng.integers(16, min(wx, 26) + 1))
        p = {"legs": legs, "shape": "round" if round_top else "rectangular", "width": wx, "depth": wz,
             "height": int(rng.integers(13, 23)), "top_thickness": int(rng.integers(2, 4)),
             "leg_thickness": int(rng.integers(2, 4))}
        return p, pick_colors(rng, self.parts), {}

    def is_rare(self, spec):
        return spec["params"]["legs"] == 5

    def has_rare(self):
        return True

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cv = Canvas(spec["colors"])
        h, t, lt = p["height"], p["top_thickness"], p["leg_thickness"]
        rnd = p["shape"] == "round"
        if rnd:
            cv.cyl_y("top", p["width"] / 2 - 0.5, h - t, h)
        else:
            cv.cbox("top", p["width"], h - t, h, p["depth"])
        for lx, lz in _leg_positions(p["legs"], p["width"], p["depth"], rnd, lt / 2 + (2.0 if rnd else 0.5)):
            cv.cbox("legs", lt, 0, h - t, lt, lx, lz)
        return cv

    def probes(self):
        return {"legs": probes.ground_contacts}

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        return [f"{plural(p['legs'], 'leg', rng)} in {c['legs']}" if rng.random() < 0.5
                else f"{num(p['legs'], rng)} {c['legs']} legs",
                f"a {p['shape']} top"]

    def plan(self, spec):
        p = spec["params"]
        tall = "low" if p["height"] < 16 else "standard-height"
        return (f"A {tall} table: a flat {p['shape']} top resting on {plural(p['legs'], 'leg')}. "
                f"The top is about {p['width']} by {p['depth']} voxels; the legs stand under its rim.")

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        sym = "rotationally symmetric" if p["shape"] == "round" else "mirror-symmetric front-back and left-right"
        return (f"The tabletop is {c['top']} and {p['top_thickness']} voxels thick; the {num(p['legs'])} legs are "
                f"{c['legs']}, {p['leg_thickness']} voxels square. Legs evenly spaced, {sym}.")


class Chair(Family):
    name, category = "chair", CAT
    nouns = ("chair", "stool", "armchair")
    parts = {"seat": WOODS + BRIGHT, "legs": WOODS + BRIGHT, "back": WOODS + BRIGHT, "arms": WOODS + BRIGHT}
    part_words = {"seat": ("seat",), "legs": ("legs", "leg"), "back": ("back", "backrest"),
                  "arms": ("arms", "armrests", "armrest")}
    main_part = "seat"
    counts = {"legs": ("leg",)}
    flags = {"has_back": ("back", "backrest"), "has_arms": ("arms", "armrests", "armrest")}

    def sample_params(self, rng, rare):
        back = bool(rng.random() < 0.75)
        arms = bool(rng.random() < 0.4)
        if rare:
            back, arms = False, True
        p = {"legs": 4, "has_back": back, "has_arms": arms, "width": int(rng.integers(16, 23)),
             "depth": int(rng.integers(16, 23)), "seat_height": int(rng.integers(10, 15)),
             "back_height": int(rng.integers(10, 16)), "leg_thickness": 2}
        colors = pick_colors(rng, self.parts)
        if not back:
            colors.pop("back")
        if not arms:
            colors.pop("arms")
        return p, colors, {}

    def is_rare(self, spec):  # armrests without a backrest
        return spec["params"]["has_arms"] and not spec["params"]["has_back"]

    def has_rare(self):
        return True

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cols = dict(spec["colors"])
        cols.setdefault("back", cols.get("seat", "brown"))
        cols.setdefault("arms", cols.get("seat", "brown"))
        cv = Canvas(cols)
        w, d, sh, lt = p["width"], p["depth"], p["seat_height"], p["leg_thickness"]
        x0, z0 = int(round(C - w / 2 + 0.5)), int(round(C - d / 2 + 0.5))
        cv.box("seat", x0, x0 + w, sh - 2, sh, z0, z0 + d)
        for lx in (x0, x0 + w - lt):
            for lz in (z0, z0 + d - lt):
                cv.box("legs", lx, lx + lt, 0, sh - 2, lz, lz + lt)
        if p["has_back"]:
            cv.box("back", x0, x0 + w, sh, sh + p["back_height"], z0, z0 + 2)
        if p["has_arms"]:
            ah = sh + 5
            for ax in (x0, x0 + w - 2):
                cv.box("arms", ax, ax + 2, ah - 1, ah, z0, z0 + d)       # rest
                cv.box("arms", ax, ax + 2, sh, ah - 1, z0 + d - 2, z0 + d)  # front post
        return cv

    def probes(self):
        return {"legs": probes.ground_contacts, "has_back": _chair_back, "has_arms": _chair_arms}

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        f = [f"{num(p['legs'], rng)} {c['legs']} legs"]
        f.append(f"a {c['back']} backrest" if p["has_back"] else choose(rng, ("no backrest", "no back")))
        f.append(f"{c['arms']} armrests" if p["has_arms"] else choose(rng, ("no armrests", "no arms")))
        return f

    def plan(self, spec):
        p = spec["params"]
        kind = "an armchair" if p["has_arms"] and p["has_back"] else "a chair" if p["has_back"] else "a stool"
        extra = []
        if p["has_back"]:
            extra.append("a vertical backrest along the back edge")
        if p["has_arms"]:
            extra.append("armrests on both sides")
        tail = (" with " + " and ".join(extra)) if extra else " with no back and no arms"
        return (f"This is {kind}: a square seat about {p['seat_height']} voxels high on {plural(p['legs'], 'leg')} "
                f"at the corners{tail}.")

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        s = f"Seat {c['seat']}, legs {c['legs']}"
        if p["has_back"]:
            s += f", backrest {c['back']} ({p['back_height']} voxels tall)"
        if p["has_arms"]:
            s += f", armrests {c['arms']}"
        return s + ". Four identical thin legs, mirror-symmetric left-right, facing +Z."


def _seat_top(occ: np.ndarray) -> int:
    """One above the seat: the highest of the widest layers."""
    area = occ.sum((0, 2))
    return int(np.flatnonzero(area == area.max())[-1]) + 1


def _chair_back(occ: np.ndarray) -> bool:
    st = _seat_top(occ)
    above = occ[:, st + 3:, :]
    if not above.any():
        return False
    zs = np.flatnonzero(occ.any((0, 1)))
    back = above[:, :, zs[0]:zs[0] + max(2, (zs[-1] - zs[0]) // 4)]
    xs = np.flatnonzero(occ.any((1, 2)))
    return bool(back.any((1, 2)).sum() >= 0.5 * (xs[-1] - xs[0] + 1))


def _chair_arms(occ: np.ndarray) -> bool:
    st = _seat_top(occ)
    zs = np.flatnonzero(occ.any((0, 1)))
    xs = np.flatnonzero(occ.any((1, 2)))
    front = occ[:, st + 1:st + 8, (zs[0] + zs[-1]) // 2 + 1:]
    edge = max(2, (xs[-1] - xs[0]) // 5)
    return bool(front[xs[0]:xs[0] + edge].any() and front[xs[-1] - edge + 1:xs[-1] + 1].any())


class Mug(Family):
    name, category = "mug", CAT
    nouns = ("mug", "cup", "coffee mug")
    parts = {"body": BRIGHT + ("white", "black", "gray"), "handle": BRIGHT + WOODS}
    part_words = {"body": ("body", "cup"), "handle": ("handle", "handles")}
    main_part = "body"
    counts = {"handles": ("handle",)}
    article_counts = ("handles",)

    def sample_params(self, rng, rare):
        handles = int(choose(rng, (1, 1, 1, 2, 0)))
        p = {"handles": handles, "radius": int(rng.integers(6, 9) if handles == 2 else rng.integers(8, 11)),
             "height": int(rng.integers(18, 28))}
        pools = dict(self.parts)
        if p["handles"] == 0:
            pools.pop("handle")
        return p, pick_colors(rng, pools), {"hollow": True}

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cols = dict(spec["colors"])
        cols.setdefault("handle", cols.get("body", "white"))
        cv = Canvas(cols)
        r, h = p["radius"], p["height"]
        cx = C - (0 if p["handles"] != 1 else 4)
        rr = min(h * 0.28, 6.0)  # leave room for one handle on +X
        cv.cyl_y("body", r, 0, 2, cx=cx)
        cv.cyl_y("body", r, 2, h, cx=cx, inner=r - 2)
        for side in (1, -1)[:p["handles"]]:
            hx = cx + side * (r + 2.5)
            cv.cyl_z("handle", rr, int(C) - 1, int(C) + 2, cx=hx, cy=h * 0.55, inner=rr - 2)
        # the ring's inner half sits inside the wall: re-hollow the cup interior
        yy = np.arange(R)[None, :, None]
        xx, zz = np.meshgrid(np.arange(R), np.arange(R), indexing="ij")
        inside = ((xx - cx) ** 2 + (zz - C) ** 2 <= (r - 2 + 0.25) ** 2)[:, None, :] & (yy >= 2)
        cv.erase(inside)
        return cv

    def probes(self):
        return {"handles": _handles}

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        if p["handles"] == 0:
            return [choose(rng, ("no handle", "no handles"))]
        return [f"{'a' if p['handles'] == 1 else num(2, rng)} {c['handle']} handle{'s' if p['handles'] > 1 else ''}"]

    def plan(self, spec):
        p = spec["params"]
        hs = {0: "no handle", 1: "one C-shaped handle on the right side",
              2: "two C-shaped handles on opposite sides"}[p["handles"]]
        return (f"A mug: an open-topped hollow cylinder with a solid bottom, {p['height']} voxels tall and "
                f"{2 * p['radius']} across, with {hs}.")

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        s = f"Body {c['body']} with walls 2 voxels thick, hollow inside"
        if p["handles"]:
            s += f"; handle{'s' if p['handles'] > 1 else ''} {c['handle']}"
        return s + ". Radially symmetric apart from the handles."


def _handles(occ: np.ndarray) -> int:
    """Pieces that stick out sideways from the body (whose radius is read on the bottom layer)."""
    xs = np.flatnonzero(occ[:, 0, :].any(1))
    if not len(xs):
        return 0
    side = occ.copy()
    side[xs[0]:xs[-1] + 1] = False
    return probes.components_2d(side.any(2))


class Cart(Family):
    name, category = "cart", CAT
    nouns = ("cart", "wagon", "trolley")
    parts = {"bed": BRIGHT + WOODS, "wheels": ("black", "gray", "brown", "navy", "white"),
             "handle": WOODS + BRIGHT}
    part_words = {"bed": ("bed", "body", "box"), "wheels": ("wheels", "wheel", "tires"), "handle": ("handle",)}
    main_part = "bed"
    counts = {"wheels": ("wheel",)}

    def sample_params(self, rng, rare):
        p = {"wheels": int(choose(rng, (4, 4, 6))), "wheel_radius": int(rng.integers(4, 7)),
             "length": int(rng.integers(22, 29)), "width": int(rng.integers(14, 21)),
             "handle": bool(rng.random() < 0.6)}
        pools = dict(self.parts)
        if not p["handle"]:
            pools.pop("handle")
        return p, pick_colors(rng, pools), {}

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cols = dict(spec["colors"])
        cols.setdefault("handle", cols.get("bed", "brown"))
        cv = Canvas(cols)
        L, W = p["length"], p["width"]
        axles = p["wheels"] // 2
        wr = min(p["wheel_radius"], (L - axles) // (2 * axles))  # neighbouring wheels never touch
        x0, z0 = int(round(C - L / 2 + 0.5)) - (2 if p["handle"] else 0), int(round(C - W / 2 + 0.5))
        bed_y = wr + 1
        cv.box("bed", x0, x0 + L, bed_y, bed_y + 2, z0, z0 + W)       # floor
        for zz in (z0, z0 + W - 1):
            cv.box("bed", x0, x0 + L, bed_y + 2, bed_y + 7, zz, zz + 1)  # side walls
        for xx in (x0, x0 + L - 1):
            cv.box("bed", xx, xx + 1, bed_y + 2, bed_y + 7, z0, z0 + W)
        for ax in np.linspace(x0 + wr, x0 + L - 1 - wr, axles):
            for zz in (z0 - 2, z0 + W):
                cv.cyl_z("wheels", wr, zz, zz + 2, cx=ax, cy=wr - 0.5)
        if p["handle"]:
            hx = x0 + L
            cv.rod("handle", (hx, bed_y + 1, C - 0.5), (min(R - 2, hx + 4), bed_y + 9, C - 0.5), 2)
        return cv

    def probes(self):
        return {"wheels": probes.ground_contacts}

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        f = [f"{num(p['wheels'], rng)} {c['wheels']} wheels"]
        if p["handle"]:
            f.append(f"a {c['handle']} handle")
        return f

    def plan(self, spec):
        p = spec["params"]
        return (f"A cart: an open rectangular box raised on {plural(p['wheels'], 'wheel')} "
                f"({p['wheels'] // 2} per side){', with a pulling handle at one end' if p['handle'] else ''}; "
                f"longer than wide and low.")

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        return (f"Box {c['bed']}, wheels {c['wheels']} (radius {p['wheel_radius']})"
                f"{', handle ' + c['handle'] if p['handle'] else ''}. Mirror-symmetric front-back.")
