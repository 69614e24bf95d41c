"""physical_plausibility: objects that must stand up: supported, balanced, resting on the ground."""
from __future__ import annotations

import numpy as np

from rl3d.stages.shapes import probes
from rl3d.stages.shapes.base import BRIGHT, C, WOODS, Canvas, Family, choose, num, pick_colors, plural

CAT = "physical_plausibility"


class Lamp(Family):
    name, category = "lamp", CAT
    nouns = ("lamp", "floor lamp", "table lamp")
    parts = {"base": WOODS + ("gold", "navy"), "pole": ("gray", "black", "gold", "white", "brown"),
             "shade": BRIGHT + ("white", "beige")}
    part_words = {"base": ("base", "foot"), "pole": ("pole", "stem", "stand"), "shade": ("shade", "lampshade")}
    main_part = "shade"

    def sample_params(self, rng, rare):
        p = {"base_radius": int(rng.integers(6, 10)), "pole_height": int(rng.integers(12, 20)),
             "shade_radius": int(rng.integers(7, 12)), "shade_height": int(rng.integers(7, 11)),
             "base_shape": str(choose(rng, ("round", "square")))}
        return p, pick_colors(rng, self.parts), {"stable": True}

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cv = Canvas(spec["colors"])
        br, ph = p["base_radius"], p["pole_height"]
        if p["base_shape"] == "round":
            cv.cyl_y("base", br, 0, 2)
        else:
            cv.cbox("base", 2 * br, 0, 2, 2 * br)
        cv.cyl_y("pole", 1.0, 2, 2 + ph)
        top = min(31, 2 + ph + p["shade_height"])
        cv.cyl_y("shade", p["shade_radius"], 2 + ph - 2, top, r_top=p["shade_radius"] * 0.55,
                 inner=None)
        return cv

    def subject(self, spec, rng):
        return f"a {choose(rng, self.nouns)} with a {spec['colors']['shade']} shade"

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        return [f"a {p['base_shape']} {c['base']} base", f"a thin {c['pole']} pole"]

    def plan(self, spec):
        p = spec["params"]
        return (f"A lamp that stands on its own: a flat heavy {p['base_shape']} base on the ground, a thin "
                f"vertical pole {p['pole_height']} voxels tall rising from its centre, and a wide conical shade "
                f"on top, centred over the base so it does not tip.")

    def detail(self, spec):
        c = spec["colors"]
        return (f"Base {c['base']}, pole {c['pole']}, shade {c['shade']} narrowing upward. "
                f"Radially symmetric; centre of mass over the base.")


class BalancedStack(Family):
    name, category = "balanced_stack", CAT
    nouns = ("stack of planks", "pile of planks", "balanced stack")
    parts = {"planks": BRIGHT + WOODS, "accent": BRIGHT + WOODS}
    part_words = {"planks": ("planks", "plank", "boards"), "accent": ("top plank", "top")}
    main_part = "planks"
    counts = {"planks": ("plank", "board", "slab")}

    def sample_params(self, rng, rare):
        n = int(rng.integers(3, 8))
        offs = [0] + [int(rng.choice((-4, -3, -2, -1, 1, 2, 3, 4))) for _ in range(n - 1)]
        p = {"planks": n, "offsets": offs, "length": int(rng.integers(16, 23)),
             "plank_height": max(2, min(5, 30 // n)), "crossed": bool(rng.random() < 0.5)}
        return p, pick_colors(rng, self.parts), {"stable": True}

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cv = Canvas(spec["colors"])
        n, L, ph = p["planks"], p["length"], p["plank_height"]
        offs = (list(p.get("offsets") or []) + [0] * n)[:n]
        # keep every partial stack balanced: cumulative offsets stay within a quarter length
        # (an offset that would leave that range is taken the other way, never dropped)
        # crossed planks rest on an 8-voxel-wide plank: offsets there are single voxels within +-2
        limit = 2 if p["crossed"] else L / 4
        x = 0.0
        for i in range(n):
            step = int(np.sign(offs[i])) if p["crossed"] else offs[i]
            if i:
                x = x + step if abs(x + step) <= limit else x - step
            part = "accent" if i == n - 1 else "planks"
            cross = p["crossed"] and i % 2 == 1
            wx, wz = (8, L) if cross else (L, 8)
            cv.cbox(part, wx, i * ph, (i + 1) * ph, wz, cx=C + (0 if cross else x), cz=C + (x if cross else 0))
        return cv

    def probes(self):
        return {"planks": probes.profile_steps_any}

    def subject(self, spec, rng):
        n = spec["params"]["planks"]
        return (f"a {choose(rng, ('stable', 'balanced', 'steady'))} stack of "
                f"{plural(n, choose(rng, ('plank', 'board')), rng)}")

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        f = [f"{c['planks']} planks", f"a {c['accent']} top plank"]
        if p["crossed"]:
            f.append("alternating directions")
        return f

    def plan(self, spec):
        p = spec["params"]
        how = "alternately crossed at right angles" if p["crossed"] else "all in one direction, slightly offset"
        return (f"A stable stack of {plural(p['planks'], 'plank')} lying flat on top of each other, {how}; "
                f"every plank rests on the one below with its centre over that support.")

    def detail(self, spec):
        c = spec["colors"]
        return (f"Planks {c['planks']}, the top plank {c['accent']}. Equal plank sizes; offsets stay small so "
                f"the centre of mass of each upper part lies over its support.")
