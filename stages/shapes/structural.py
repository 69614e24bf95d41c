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
