"""stylized_abstract: primitives rendered in a style: thin-rod wireframe, hollow shells, exaggerated."""
from __future__ import annotations

import numpy as np

from rl3d.stages.shapes import probes
from rl3d.stages.shapes.base import BRIGHT, C, R, Canvas, Family, choose, num, pick_colors

CAT = "stylized_abstract"


class Wireframe(Family):
    name, category = "wireframe", CAT
    nouns = ("wireframe", "wire model", "rod frame")
    parts = {"rods": BRIGHT + ("white", "black", "gray"), "joints": BRIGHT + ("white", "black")}
    part_words = {"rods": ("rods", "edges", "wires"), "joints": ("joints", "corners", "nodes")}
    main_part = "rods"
    SHAPES = {"cube": 12, "pyramid": 8, "prism": 9, "tall box": 12}

    def sample_params(self, rng, rare):
        shape = str(choose(rng, tuple(self.SHAPES)))
        p = {"shape": shape, "size": int(rng.integers(20, 29)), "joints": bool(rng.random() < 0.5)}
        pools = dict(self.parts)
        if not p["joints"]:
            pools.pop("joints")
        return p, pick_colors(rng, pools), {"wireframe": True}

    def _edges(self, p):
        s = p["size"]
        lo, hi = int(C - s / 2 + 0.5), int(C - s / 2 + 0.5) + s - 1
        top = min(R - 1, s - 1 if p["shape"] != "tall box" else R - 1)
        if p["shape"] == "tall box":
            lo, hi = int(C - s / 4 + 0.5), int(C - s / 4 + 0.5) + s // 2 - 1
        b = [(lo, 0, lo), (hi, 0, lo), (hi, 0, hi), (lo, 0, hi)]
        edges = [(b[i], b[(i + 1) % 4]) for i in range(4)]
        if p["shape"] == "pyramid":
            apex = (int(C), top, int(C))
            return edges + [(v, apex) for v in b], b + [apex]
        if p["shape"] == "prism":  # triangular prism: ridge along x
            r0, r1 = (lo, top, int(C)), (hi, top, int(C))
            return edges + [(b[0], r0), (b[3], r0), (b[1], r1), (b[2], r1), (r0, r1)], b + [r0, r1]
        t = [(x, top, z) for x, _, z in b]
        return edges + [(t[i], t[(i + 1) % 4]) for i in range(4)] + [(b[i], t[i]) for i in range(4)], b + t

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cols = dict(spec["colors"])
        cv = Canvas(cols)
        edges, corners = self._edges(p)
        for a, b in edges:
            cv.rod("rods", a, b, 1)
        if p["joints"] and "joints" in cols:
            for x, y, z in corners:
                cv.recolor("joints", cv.region(x - 1, x + 2, y - 1, y + 2, z - 1, z + 2))
        return cv

    def subject(self, spec, rng):
        return f"a {spec['colors']['rods']} {choose(rng, self.nouns)} {spec['params']['shape']}"

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        f = [f"thin {c['rods']} rods along the edges", "an empty inside"]
        if p["joints"] and "joints" in c:
            f.append(f"{c['joints']} corners")
        return f

    def plan(self, spec):
        p = spec["params"]
        return (f"A wireframe {p['shape']}: only its {self.SHAPES[p['shape']]} edges drawn as one-voxel rods, "
                f"faces and interior empty, standing on its base, about {p['size']} voxels across.")

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        return (f"Rods {c['rods']}{', corner joints ' + c['joints'] if p['joints'] and 'joints' in c else ''}. "
                f"Thin-rod wireframe style, symmetric like the solid {p['shape']}.")


class HollowShell(Family):
    name, category = "hollow_shell", CAT
    nouns = ("hollow shape", "shell", "hollow object")
    parts = {"shell": BRIGHT + ("white", "gray", "black"), "rim": BRIGHT + ("white", "black")}
    part_words = {"shell": ("shell", "walls", "wall"), "rim": ("rim", "edge", "band")}
    main_part = "shell"

    def sample_params(self, rng, rare):
        shape = str(choose(rng, ("sphere", "box", "cylinder", "dome")))
        p = {"shape": shape, "size": int(rng.integers(20, 31)), "wall": int(choose(rng, (1, 2))),
             "opening": str(choose(rng, ("top", "front", "none")))}
        return p, pick_colors(rng, self.parts), {"hollow": True}

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cv = Canvas(spec["colors"])
        s, t = p["size"], p["wall"]
        r = s / 2
        if p["shape"] == "sphere":
            cv.sphere("shell", C, r - 0.5, C, r, inner=t)
        elif p["shape"] == "dome":
            cv.ellipsoid("shell", C, 0, C, r, s - 1, r, y_min=0, inner=t)
            cv.cyl_y("shell", r, 0, t)
        elif p["shape"] == "cylinder":
            cv.cyl_y("shell", r - 0.5, 0, s, inner=r - 0.5 - t)
            cv.cyl_y("shell", r - 0.5, 0, t)
            cv.cyl_y("shell", r - 0.5, s - t, s)
        else:
            cv.cbox("shell", s, 0, s, s)
            b0 = int(np.floor(C - s / 2 + 1.0))  # same corner as cbox
            cv.erase(cv.region(b0 + t, b0 + s - t, t, s - t, b0 + t, b0 + s - t))
        # a rim band painted around the middle height
        ys = np.flatnonzero(cv.labels.any((0, 2)))
        mid = (ys[0] + ys[-1]) // 2
        cv.recolor("rim", cv.region(y0=mid, y1=mid + 2))
        if p["opening"] == "top":
            cv.erase(cv.region(C - r / 2, C + r / 2 + 1, ys[-1] - t - 1, R, C - r / 2, C + r / 2 + 1))
        elif p["opening"] == "front":
            cv.erase(cv.region(C - r / 2, C + r / 2 + 1, mid + 3, mid + 3 + r / 2, C + r - t - 1, R))  # front wall only
        return cv

    def probes(self):
        return {}

    def subject(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        return f"a hollow {c['shell']} {p['shape']}"

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        f = [f"a {c['rim']} rim around the middle", f"thin walls"]
        if p["opening"] != "none":
            f.append(f"an opening in the {p['opening']}")
        return f

    def plan(self, spec):
        p = spec["params"]
        op = {"top": "a round hole in the top", "front": "a window cut in the front", "none": "no opening"}
        return (f"A hollow {p['shape']} about {p['size']} voxels across: a thin closed shell with empty inside "
                f"and {op[p['opening']]}, resting on the ground.")

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        return (f"Shell {c['shell']}, {p['wall']} voxel{'s' if p['wall'] > 1 else ''} thick, with a {c['rim']} "
                f"band around the middle. Symmetric, minimal abstract style.")
