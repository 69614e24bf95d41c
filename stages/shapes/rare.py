"""rare_entities: whole families held out of training (eval split only)."""
from __future__ import annotations

import numpy as np

from rl3d.stages.shapes import probes
from rl3d.stages.shapes.base import BRIGHT, C, R, Canvas, Family, choose, num, pick_colors, plural

CAT = "rare_entities"


class Rocket(Family):
    name, category = "rocket", CAT
    nouns = ("rocket", "space rocket", "rocket ship")
    parts = {"body": ("white", "gray", "red", "blue", "yellow"), "nose": BRIGHT, "fins": BRIGHT + ("black",),
             "window": ("cyan", "blue", "black", "yellow")}
    part_words = {"body": ("body", "hull"), "nose": ("nose", "nose cone", "tip"), "fins": ("fins", "fin"),
                  "window": ("window", "porthole")}
    main_part = "body"
    counts = {"fins": ("fin",)}
    held_out = True

    def sample_params(self, rng, rare):
        p = {"fins": int(choose(rng, (3, 4))), "radius": int(rng.integers(4, 7)), "height": int(rng.integers(26, 32))}
        return p, pick_colors(rng, self.parts), {}

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cv = Canvas(spec["colors"])
        r, h = p["radius"], p["height"]
        nose_h = r + 3
        cv.cyl_y("body", r, 0, h - nose_h)
        cv.cyl_y("nose", r, h - nose_h, h, r_top=0.5)
        for k in range(p["fins"]):  # fins flare out at the bottom, spaced evenly around
            a = 2 * np.pi * k / p["fins"]
            d = np.array([np.cos(a), 0, np.sin(a)])
            for j in range(0, 7):
                p0 = np.array([C, j, C]) + d * (r - 1)
                p1 = np.array([C, j, C]) + d * (r + 6 - j * 0.7)
                cv.rod("fins", p0, p1, 1)
        wy = int((h - nose_h) * 0.65)
        cv.recolor("window", cv.region(C - 1, C + 2, wy - 1, wy + 2, C + r - 1, R))
        return cv

    def probes(self):
        def fins(occ):
            mid = occ.shape[1] // 2
            rr = probes.y_extent(occ)
            body = occ[:, (rr[0] + rr[1]) // 2, :]
            xs = np.flatnonzero(body.any(1))
            if not len(xs):
                return 0
            rad = (xs[-1] - xs[0] + 1) / 2 + 0.5
            xx, zz = np.meshgrid(np.arange(occ.shape[0]), np.arange(occ.shape[2]), indexing="ij")
            cx, cz = np.argwhere(body).mean(0)
            outside = ((xx - cx) ** 2 + (zz - cz) ** 2) > rad ** 2
            del mid
            return probes.components_2d(occ[:, 1, :] & outside)
        return {"fins": fins}

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        return [f"{num(p['fins'], rng)} {c['fins']} fins", f"a {c['nose']} nose cone", f"a {c['window']} window"]

    def plan(self, spec):
        p = spec["params"]
        return (f"A rocket standing upright on its fins: a tall narrow cylinder {p['height']} voxels high with a "
                f"pointed nose cone on top and {plural(p['fins'], 'fin')} flaring out at the base.")

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        return (f"Body {c['body']}, nose cone {c['nose']}, fins {c['fins']}, a {c['window']} window on the front. "
                f"{p['fins']}-fold rotational symmetry.")
