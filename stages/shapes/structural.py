"""spatial_structural: objects defined by how their parts are arranged and counted."""
from __future__ import annotations

import numpy as np

from rl3d.stages.shapes import probes
from rl3d.stages.shapes.base import BRIGHT, C, R, WOODS, Canvas, Family, choose, num, pick_colors, plural

CAT = "spatial_structural"
STONE = ("gray", "beige", "white", "brown", "black", "red")


class Tower(Family):
    name, category = "tower", CAT
    nouns = ("tower", "building", "skyscraper")
    parts = {"walls": STONE + ("blue", "yellow"), "ledges": WOODS + BRIGHT, "roof": BRIGHT + WOODS}
    part_words = {"walls": ("walls", "wall", "body"), "ledges": ("ledges", "ledge", "trim", "floor slabs"),
                  "roof": ("roof",)}
    main_part = "walls"
    counts = {"floors": ("floor", "storey", "story", "level")}

    def sample_params(self, rng, rare):
        floors = int(rng.integers(2, 7))
        roof = str(choose(rng, ("flat", "pointed")))
        w = int(rng.integers(9, 15))
        roof_h = (w + 1) // 2 if roof == "pointed" else 0
        fh = max(2, min(11, (31 - roof_h) // floors - 1 - int(rng.integers(0, 2))))  # tall: fill the height
        p = {"floors": floors, "floor_height": fh, "width": w, "roof": roof,
             "windows": bool(rng.random() < 0.6)}
        if roof == "flat":
            colors = pick_colors(rng, {k: v for k, v in self.parts.items() if k != "roof"})
        else:
            colors = pick_colors(rng, self.parts)
        return p, colors, {}

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cols = dict(spec["colors"])
        cols.setdefault("roof", cols.get("ledges", "gray"))
        cv = Canvas(cols)
        w, fh = p["width"], p["floor_height"]
        y = 0
        for _ in range(p["floors"]):
            cv.cbox("walls", w, y, y + fh, w)
            if p["windows"] and fh >= 3:
                # one window per floor on each face, carved one voxel deep
                wy = slice(y + 1, y + fh - 1 if fh > 3 else y + 2)
                m = np.zeros_like(cv.labels, bool)
                c0, c1 = int(C) - 1, int(C) + 3
                x0, x1 = int(round(C - w / 2 + 0.5)), int(round(C - w / 2 + 0.5)) + w
                m[c0:c1, wy, x1 - 1] = True
                m[c0:c1, wy, x0] = True
                m[x0, wy, c0:c1] = True
                m[x1 - 1, wy, c0:c1] = True
                cv.erase(m)
            cv.cbox("ledges", w + 2, y + fh, y + fh + 1, w + 2)
            y += fh + 1
        if p["roof"] == "pointed":
            rw = w
            while rw > 0 and y < R:
                cv.cbox("roof", rw, y, y + 1, rw)
                rw -= 2
                y += 1
        return cv

    def probes(self):
        return {"floors": probes.profile_peaks}

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        f = [f"{plural(p['floors'], choose(rng, ('floor', 'storey', 'level')), rng)}",
             f"{c['ledges']} ledges between the floors"]
        if p["roof"] == "pointed":
            f.append(f"a pointed {c['roof']} roof")
        else:
            f.append("a flat roof")
        if p["windows"]:
            f.append("windows on every side")
        return f

    def plan(self, spec):
        p = spec["params"]
        return (f"A square tower of {plural(p['floors'], 'floor')} stacked vertically, each floor a block "
                f"{p['floor_height']} voxels tall capped by a thin wider ledge, with a {p['roof']} roof. "
                f"It is much taller than wide ({p['width']} voxels across).")

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        s = f"Walls {c['walls']}, ledges {c['ledges']}"
        if p["roof"] == "pointed":
            s += f", stepped pyramid roof {c['roof']}"
        s += ". " + ("One window per face on every floor. " if p["windows"] else "Plain walls without windows. ")
        return s + "Four-fold symmetric about the vertical axis."


class Stairs(Family):
    name, category = "stairs", CAT
    nouns = ("staircase", "flight of stairs", "set of stairs", "stairway")
    parts = {"steps": STONE + WOODS, "runner": BRIGHT}
    part_words = {"steps": ("steps", "step", "stairs"), "runner": ("runner", "carpet")}
    main_part = "steps"
    counts = {"steps": ("step", "stair")}

    def sample_params(self, rng, rare):
        n = int(rng.integers(3, 9))
        p = {"steps": n, "step_height": int(rng.integers(2, 30 // n + 1)) if n > 3 else int(rng.integers(4, 9)),
             "step_depth": int(28 // n), "width": int(rng.integers(12, 25)), "runner": bool(rng.random() < 0.5)}
        p["step_height"] = max(2, min(p["step_height"], 30 // n))
        colors = pick_colors(rng, self.parts if p["runner"] else {"steps": self.parts["steps"]})
        return p, colors, {}

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cv = Canvas(spec["colors"])
        n, sh, sd, w = p["steps"], p["step_height"], p["step_depth"], p["width"]
        z_front = int(C + n * sd / 2)
        x0 = int(round(C - w / 2 + 0.5))
        for i in range(n):  # step i is (i+1)*sh tall, i steps back from the front
            z1 = z_front - i * sd
            cv.box("steps", x0, x0 + w, 0, (i + 1) * sh, z1 - sd, z1)
            if p["runner"] and "runner" in spec["colors"]:
                rw = max(2, w // 3)
                m = cv.region(C - rw / 2 + 0.5, C + rw / 2 + 0.5, (i + 1) * sh - 1, (i + 1) * sh, z1 - sd, z1)
                cv.recolor("runner", m)
        return cv

    def probes(self):
        return {"steps": probes.height_plateaus}

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        f = [f"{plural(p['steps'], 'step', rng)}"]
        if p["runner"] and "runner" in c:
            f.append(f"a {c['runner']} runner down the middle")
        return f

    def plan(self, spec):
        p = spec["params"]
        return (f"A straight staircase of {plural(p['steps'], 'step')} rising toward the back, each step "
                f"{p['step_height']} voxels higher and {p['step_depth']} voxels deep, solid underneath.")

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        s = f"The steps are {c['steps']}"
        if p["runner"] and "runner" in c:
            s += f" with a {c['runner']} carpet runner on the treads"
        return s + f". Equal steps, mirror-symmetric left-right, {p['width']} voxels wide."


class Stack(Family):
    name, category = "stack", CAT
    nouns = ("stack of blocks", "block stack", "pile of boxes")
    parts = {"bottom": BRIGHT + WOODS, "middle": BRIGHT + WOODS, "top": BRIGHT + WOODS}
    part_words = {"bottom": ("bottom", "base"), "middle": ("middle", "blocks"), "top": ("top",)}
    main_part = "bottom"
    counts = {"blocks": ("block", "box", "cube")}

    def sample_params(self, rng, rare):
        n = int(rng.integers(2, 6))
        p = {"blocks": n, "base_width": int(rng.integers(22, 29)), "shrink": int(rng.integers(3, 6))}
        pools = dict(self.parts)
        if n == 2:
            pools.pop("middle")
        return p, pick_colors(rng, pools), {}

    def _blocks(self, p):
        n, w = p["blocks"], p["base_width"]
        bh = 30 // n
        out = []
        for i in range(n):
            wi = max(2, w - i * p["shrink"])
            out.append(("bottom" if i == 0 else "top" if i == n - 1 else "middle", wi, i * bh, (i + 1) * bh))
        return out

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cols = dict(spec["colors"])
        cols.setdefault("middle", cols.get("bottom", "gray"))
        cv = Canvas(cols)
        for part, wi, y0, y1 in self._blocks(p):
            cv.cbox(part, wi, y0, y1, wi)
        return cv

    def probes(self):
        return {"blocks": probes.profile_steps}

    def subject(self, spec, rng):
        n = spec["params"]["blocks"]
        return f"{choose(rng, ('a stack of', 'a pile of'))} {plural(n, choose(rng, ('block', 'box', 'cube')), rng)}"

    def features(self, spec, rng):
        c = spec["colors"]
        f = [f"a {c['bottom']} bottom block", f"a {c['top']} top block"]
        if "middle" in c:
            f.append(f"{c['middle']} blocks in the middle")
        return f

    def plan(self, spec):
        p = spec["params"]
        return (f"A centred stack of {plural(p['blocks'], 'square block')} of equal height, each smaller "
                f"than the one below, from {p['base_width']} voxels wide at the base; a stepped pyramid silhouette.")

    def detail(self, spec):
        c = spec["colors"]
        s = f"Bottom block {c['bottom']}, top block {c['top']}"
        if "middle" in c:
            s += f", middle blocks {c['middle']}"
        return s + ". All blocks centred on one vertical axis, four-fold symmetric."


class Shelf(Family):
    name, category = "shelf", CAT
    nouns = ("bookshelf", "shelf", "shelving unit", "bookcase")
    parts = {"frame": WOODS + BRIGHT, "boards": WOODS + BRIGHT}
    part_words = {"frame": ("frame", "sides", "side panels"), "boards": ("shelves", "boards", "shelf boards")}
    main_part = "frame"
    counts = {"shelves": ("shelf", "shelve", "board")}

    def sample_params(self, rng, rare):
        p = {"shelves": int(rng.integers(2, 7)), "width": int(rng.integers(16, 27)), "depth": int(rng.integers(7, 11)),
             "height": int(rng.integers(22, 31)), "back_panel": bool(rng.random() < 0.5)}
        return p, pick_colors(rng, self.parts), {}

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cv = Canvas(spec["colors"])
        w, d, h, n = p["width"], p["depth"], p["height"], p["shelves"]
        x0, z0 = int(round(C - w / 2 + 0.5)), int(round(C - d / 2 + 0.5))
        cv.box("frame", x0, x0 + 2, 0, h, z0, z0 + d)
        cv.box("frame", x0 + w - 2, x0 + w, 0, h, z0, z0 + d)
        if p["back_panel"]:
            cv.box("frame", x0, x0 + w, 0, h, z0, z0 + 1)
        for i in range(n):  # boards evenly from the floor to the top
            y = int(round(i * (h - 1) / (n - 1))) if n > 1 else 0
            cv.box("boards", x0 + 2, x0 + w - 2, y, y + 1, z0, z0 + d)
        return cv

    def probes(self):
        def count(occ):
            zs = np.flatnonzero(occ.any((0, 1)))
            xs = np.flatnonzero(occ.any((1, 2)))
            if not len(zs):
                return 0
            col = occ[(xs[0] + xs[-1]) // 2, :, zs[-1]]  # front edge, centre: one run per board
            return probes.vertical_runs(col)
        return {"shelves": count}

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        f = [f"{num(p['shelves'], rng)} {c['boards']} shelves"]
        f.append("a back panel" if p["back_panel"] else "an open back")
        return f

    def plan(self, spec):
        p = spec["params"]
        return (f"A free-standing shelf: two tall side panels joined by {plural(p['shelves'], 'horizontal board')} "
                f"evenly spaced from bottom to top; {p['height']} voxels tall, {p['width']} wide, shallow.")

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        return (f"Side panels {c['frame']}, shelf boards {c['boards']}"
                f"{', closed back panel' if p['back_panel'] else ', open back'}. Mirror-symmetric left-right.")


class Bridge(Family):
    name, category = "bridge", CAT
    nouns = ("bridge", "footbridge")
    parts = {"deck": STONE + WOODS, "piers": STONE + WOODS, "railings": BRIGHT + WOODS}
    part_words = {"deck": ("deck", "road"), "piers": ("piers", "pillars", "supports"),
                  "railings": ("railings", "rails", "railing")}
    main_part = "deck"
    counts = {"piers": ("pier", "pillar", "support")}

    def sample_params(self, rng, rare):
        p = {"piers": int(rng.integers(2, 6)), "deck_height": int(rng.integers(10, 19)),
             "width": int(rng.integers(8, 13)), "railings": bool(rng.random() < 0.6)}
        pools = dict(self.parts)
        if not p["railings"]:
            pools.pop("railings")
        return p, pick_colors(rng, pools), {}

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cols = dict(spec["colors"])
        cols.setdefault("railings", cols.get("deck", "gray"))
        cv = Canvas(cols)
        n, dh, w = p["piers"], p["deck_height"], p["width"]
        z0 = int(round(C - w / 2 + 0.5))
        cv.box("deck", 0, R, dh, dh + 2, z0, z0 + w)
        xs = np.linspace(3, R - 6, n).round().astype(int)
        for x in xs:
            cv.box("piers", x, x + 3, 0, dh, z0 + 1, z0 + w - 1)
        if p["railings"]:
            for z in (z0, z0 + w - 1):
                cv.box("railings", 0, R, dh + 4, dh + 5, z, z + 1)
                for x in range(1, R, 5):
                    cv.box("railings", x, x + 1, dh + 2, dh + 4, z, z + 1)
        return cv

    def probes(self):
        return {"piers": probes.ground_contacts}

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        f = [f"{num(p['piers'], rng)} {c['piers']} piers"]
        f.append(f"{c['railings']} railings" if p["railings"] else "no railings")
        return f

    def plan(self, spec):
        p = spec["params"]
        return (f"A straight bridge: a long flat deck spanning the full width left to right, {p['deck_height']} "
                f"voxels above the ground, carried by {plural(p['piers'], 'pier')} evenly spaced beneath it.")

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        return (f"Deck {c['deck']}, piers {c['piers']}"
                f"{', railings ' + c['railings'] + ' on both edges' if p['railings'] else ', no railings'}. "
                f"Mirror-symmetric front-back, regular spacing.")
