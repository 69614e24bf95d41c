"""organic_forms: plants and figures built from rounded parts."""
from __future__ import annotations

import numpy as np

from rl3d.stages.shapes import probes
from rl3d.stages.shapes.base import BRIGHT, C, Canvas, Family, choose, num, pick_colors, plural

CAT = "organic_forms"
LEAVES = ("green", "teal", "orange", "yellow", "red")
ODD_LEAVES = ("blue", "purple", "pink", "navy", "cyan")  # held out: never leaf colours in train


class Tree(Family):
    name, category = "tree", CAT
    nouns = ("tree", "pine tree", "fir tree", "oak tree", "round tree")
    parts = {"trunk": ("brown", "beige", "black", "gray"), "leaves": LEAVES}
    part_words = {"trunk": ("trunk",), "leaves": ("leaves", "foliage", "crown", "canopy")}
    main_part = "leaves"
    counts = {"tiers": ("tier", "layer")}

    def sample_params(self, rng, rare):
        pine = bool(rng.random() < 0.5)
        p = {"shape": "pine" if pine else "round",
             "trunk_height": int(rng.integers(5, 10)) if pine else int(rng.integers(9, 14)),
             "trunk_radius": float(choose(rng, (1.5, 2.0, 2.5)))}
        if pine:
            p["tiers"] = int(rng.integers(2, 5))
        else:
            p["crown_radius"] = int(rng.integers(8, 11))
        colors = pick_colors(rng, self.parts)
        if rare:
            colors["leaves"] = str(choose(rng, ODD_LEAVES))
        return p, colors, {}

    def is_rare(self, spec):
        return spec["colors"].get("leaves") in ODD_LEAVES

    def has_rare(self):
        return True

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cv = Canvas(spec["colors"])
        th = p["trunk_height"]
        if p["shape"] == "pine":
            n = p["tiers"]
            top = 31
            tier_h = (top - th + (n - 1)) // n  # tiers overlap by 1 layer
            y = th
            for i in range(n):  # each tier's base clearly wider than the tip of the one below
                r0 = 12 - 6 * i / max(n - 1, 1)
                cv.cyl_y("leaves", r0, y, y + tier_h, r_top=1.0 if i == n - 1 else r0 * 0.25)
                y += tier_h - 1
            cv.cyl_y("trunk", p["trunk_radius"], 0, th + 1)
        else:
            cr = p["crown_radius"]
            cy = min(31 - cr, th + cr - 2)
            cv.cyl_y("trunk", p["trunk_radius"], 0, cy)
            cv.sphere("leaves", C, cy, C, cr)
        return cv

    def probes(self):
        return {"tiers": probes.profile_peaks}

    def subject(self, spec, rng):
        pine = spec["params"].get("shape") == "pine"
        noun = choose(rng, ("pine tree", "fir tree", "tree") if pine else ("tree", "oak tree", "round tree"))
        return f"a {spec['colors']['leaves']} {noun}"

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        f = [f"a {c['trunk']} trunk"]
        if p["shape"] == "pine":
            f.append(f"{plural(p['tiers'], 'tier', rng)} of {c['leaves']} foliage")
        else:
            f.append(f"a round {c['leaves']} crown")
        return f

    def plan(self, spec):
        p = spec["params"]
        if p["shape"] == "pine":
            return (f"A pine tree: a short trunk {p['trunk_height']} voxels tall topped by "
                    f"{plural(p['tiers'], 'cone-shaped tier')} of foliage stacked and narrowing to a point.")
        return (f"A round tree: a vertical trunk with a large spherical crown of radius {p['crown_radius']} "
                f"on top, much wider than the trunk.")

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        return (f"Trunk {c['trunk']}, about {int(2 * p['trunk_radius'] + 1)} voxels thick; foliage {c['leaves']}. "
                f"Radially symmetric around the trunk, organic rounded style.")


class Cactus(Family):
    name, category = "cactus", CAT
    nouns = ("cactus", "saguaro cactus", "desert cactus")
    parts = {"body": ("green", "teal"), "pot": ("orange", "brown", "red", "beige", "white", "gray"),
             "flower": ("pink", "red", "yellow", "purple", "white")}
    part_words = {"body": ("body", "stem"), "pot": ("pot", "planter"), "flower": ("flower", "blossom")}
    main_part = "body"
    counts = {"arms": ("arm", "branch")}

    def sample_params(self, rng, rare):
        arms = 4 if rare else int(choose(rng, (0, 1, 2, 2, 3)))
        dirs = [int(d) for d in rng.permutation(4)[:arms]]
        p = {"arms": arms, "arm_dirs": sorted(dirs), "height": int(rng.integers(24, 31)),
             "arm_heights": [int(rng.integers(9, 13)) for _ in range(arms)],
             "arm_lengths": [int(rng.integers(7, 11)) for _ in range(arms)],
             "pot": bool(rng.random() < 0.5), "flower": bool(rng.random() < 0.4)}
        pools = {"body": self.parts["body"]}
        if p["pot"]:
            pools["pot"] = self.parts["pot"]
        if p["flower"]:
            pools["flower"] = self.parts["flower"]
        return p, pick_colors(rng, pools), {}

    def is_rare(self, spec):
        return spec["params"]["arms"] >= 4

    def has_rare(self):
        return True

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cols = dict(spec["colors"])
        cv = Canvas(cols)
        n = p["arms"]
        dirs = (list(p.get("arm_dirs") or []) + [0, 1, 2, 3])[:n]
        ah = (list(p.get("arm_heights") or []) + [11] * 4)[:n]
        al = (list(p.get("arm_lengths") or []) + [9] * 4)[:n]
        h = p["height"]
        cv.cyl_y("body", 3, 0, h - 1)
        cv.cyl_y("body", 2, h - 1, h)
        for d, y, L in zip(dirs, ah, al):
            dx, dz = ((1, 0), (-1, 0), (0, 1), (0, -1))[d]
            ox, oz = C + 7.5 * dx, C + 7.5 * dz
            # horizontal elbow from the trunk, then the arm rises
            lo = np.array([C, y, C]) + np.array([dx, 0, dz]) * 2
            hi = np.array([ox, y, oz])
            x0, x1 = sorted((lo[0], hi[0]))
            z0, z1 = sorted((lo[2], hi[2]))
            cv.box("body", round(x0 - 1 + 0.5 * (dx == 0)), round(x1 + 2), y, y + 3,
                   round(z0 - 1 + 0.5 * (dz == 0)), round(z1 + 2))
            cv.cyl_y("body", 1.5, y, min(y + L, h - 3), cx=ox, cz=oz)
        if p["pot"] and "pot" in cols:
            cv.cyl_y("pot", 6, 0, 6, r_top=7)
            m = np.zeros_like(cv.labels, bool)
            cv.cyl_y("body", 3, 5, 7)  # the body stands in the pot's soil
            del m
        if p["flower"] and "flower" in cols:
            cv.cyl_y("flower", 2.2, h, h + 2)
        return cv

    def probes(self):
        return {"arms": lambda occ: probes.slice_components_max(occ, 0.3, 0.75) - 1}

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        f = [f"{num(p['arms'], rng)} arms" if p["arms"] else choose(rng, ("no arms", "zero arms"))]
        if p["pot"] and "pot" in c:
            f.append(f"a {c['pot']} pot")
        if p["flower"] and "flower" in c:
            f.append(f"a {c['flower']} flower on top")
        return f

    def plan(self, spec):
        p = spec["params"]
        where = "standing in a pot" if p["pot"] else "standing on the ground"
        arms = f"with {plural(p['arms'], 'arm')} that bend upward" if p["arms"] else "with no arms"
        return f"A tall columnar cactus {where}, {arms}; about {p['height']} voxels tall and narrow."

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        s = f"Body and arms {c['body']}"
        if p["pot"] and "pot" in c:
            s += f", flared pot {c['pot']}"
        if p["flower"] and "flower" in c:
            s += f", a {c['flower']} flower on the top"
        sym = "asymmetric" if p["arms"] in (1, 3) else "roughly symmetric"
        return s + f". Arms are elbow-shaped columns on different sides, {sym}."


class Snowman(Family):
    name, category = "snowman", CAT
    nouns = ("snowman", "snow man", "snow figure")
    parts = {"body": ("white",), "hat": ("black", "red", "blue", "green", "brown", "navy"),
             "nose": ("orange",), "scarf": ("red", "blue", "green", "yellow", "purple", "pink")}
    part_words = {"body": ("body", "snowballs", "balls", "snow"), "hat": ("hat",), "nose": ("nose", "carrot"),
                  "scarf": ("scarf",)}
    main_part = "body"
    counts = {"balls": ("ball", "snowball", "tier")}

    def sample_params(self, rng, rare):
        balls = int(choose(rng, (2, 3, 3)))
        p = {"balls": balls, "hat": bool(rng.random() < 0.7), "scarf": bool(rng.random() < 0.5),
             "scale": float(choose(rng, (0.9, 1.0)))}
        pools = {"body": self.parts["body"], "nose": self.parts["nose"]}
        if p["hat"]:
            pools["hat"] = self.parts["hat"]
        if p["scarf"]:
            pools["scarf"] = self.parts["scarf"]
        colors = pick_colors(rng, pools)
        if rare:
            colors["body"] = str(choose(rng, ("green", "blue", "purple", "pink")))
            if colors["body"] in (colors.get("hat"), colors.get("scarf")):
                colors["body"] = next(c for c in ("green", "blue", "purple", "pink")
                                      if c not in (colors.get("hat"), colors.get("scarf")))
        return p, colors, {}

    def is_rare(self, spec):
        return spec["colors"].get("body", "white") != "white"

    def has_rare(self):
        return True

    def _radii(self, p):
        base = (6.5, 5.0, 3.8) if p["balls"] == 3 else (7.5, 5.5)
        return [r * p["scale"] for r in base]

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cols = dict(spec["colors"])
        cols.setdefault("nose", "orange")
        cv = Canvas(cols)
        y = 0.0
        centres = []
        for r in self._radii(p):
            cy = y + r - 0.5
            cv.sphere("body", C, cy, C, r)
            centres.append((cy, r))
            y = cy + r - 1.5  # balls overlap so they stick together
        hy, hr = centres[-1]
        cv.box("nose", int(C), int(C) + 1, int(hy), int(hy) + 1, int(C + hr), int(C + hr) + 3)
        if p["hat"] and "hat" in cols:
            by = int(hy + 0.55 * hr)
            cv.cyl_y("hat", 0.8 * hr, by, by + 1)
            cv.cyl_y("hat", 0.55 * hr, by + 1, min(32, by + 5))
        if p["scarf"] and "scarf" in cols:
            cv.recolor("scarf", cv.region(y0=int(hy - hr) , y1=int(hy - hr) + 2))
        return cv

    def probes(self):
        return {"balls": probes.width_maxima}

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        f = [f"{num(p['balls'], rng)} {c['body']} snowballs", "a carrot nose"]
        if p["hat"] and "hat" in c:
            f.append(f"a {c['hat']} hat")
        if p["scarf"] and "scarf" in c:
            f.append(f"a {c['scarf']} scarf")
        return f

    def plan(self, spec):
        p = spec["params"]
        return (f"A snowman made of {plural(p['balls'], 'ball')} stacked from large to small, "
                f"a head on top{' wearing a hat' if p['hat'] else ''}, with a nose pointing forward.")

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        s = f"Snowballs {c['body']}, carrot nose {c.get('nose', 'orange')}"
        if p["hat"] and "hat" in c:
            s += f", top hat {c['hat']}"
        if p["scarf"] and "scarf" in c:
            s += f", scarf {c['scarf']} at the neck"
        return s + ". Radially symmetric body, the nose breaks the symmetry toward the front (+Z)."


class Mushroom(Family):
    name, category = "mushroom", CAT
    nouns = ("mushroom", "toadstool")
    parts = {"cap": ("red", "brown", "orange", "yellow", "beige", "purple"), "stem": ("white", "beige", "gray"),
             "spots": ("white", "yellow", "beige")}
    part_words = {"cap": ("cap", "caps"), "stem": ("stem", "stems", "stalk"), "spots": ("spots", "dots")}
    main_part = "cap"
    counts = {"mushrooms": ("mushroom", "toadstool")}

    def sample_params(self, rng, rare):
        n = int(choose(rng, (1, 1, 2, 3)))
        p = {"mushrooms": n, "spots": bool(rng.random() < 0.5), "cap_radius": int(rng.integers(9, 14)),
             "stem_height": int(rng.integers(9, 15))}
        pools = {"cap": self.parts["cap"], "stem": self.parts["stem"]}
        if p["spots"]:
            pools["spots"] = self.parts["spots"]
        colors = pick_colors(rng, pools)
        if rare:
            colors["cap"] = str(choose(rng, ("blue", "cyan", "navy", "teal")))
        return p, colors, {}

    def is_rare(self, spec):
        return spec["colors"].get("cap") in ("blue", "cyan", "navy", "teal")

    def has_rare(self):
        return True

    def _layout(self, p):
        n, cr, sh = p["mushrooms"], p["cap_radius"], p["stem_height"]
        if n == 1:
            return [(C, C, cr, sh)]
        big = (C - 3, C - 2, cr * 0.8, sh)
        smalls = [(C + 8, C + 6, cr * 0.45, sh * 0.5), (C + 7, C - 9, cr * 0.4, sh * 0.4)]
        return [big] + smalls[:n - 1]

    def build(self, spec):
        p = {**self.defaults(), **spec["params"]}
        cv = Canvas(spec["colors"])
        for cx, cz, cr, sh in self._layout(p):
            sr = max(1.5, cr * 0.3)
            cv.cyl_y("stem", sr, 0, int(sh) + 1, cx=cx, cz=cz)
            cv.ellipsoid("cap", cx, sh, cz, cr, cr * 0.75, cr, y_min=int(sh))
            if p["spots"] and "spots" in spec["colors"]:
                ry = cr * 0.75
                for ang in np.linspace(0, 2 * np.pi, 6, endpoint=False):
                    sx, sz = cx + 0.55 * cr * np.cos(ang), cz + 0.55 * cr * np.sin(ang)
                    sy = sh + ry * np.sqrt(max(0.0, 1 - 0.55 ** 2))
                    cv.recolor("spots", cv.region(sx - 1, sx + 1, sy - 1, sy + 2, sz - 1, sz + 1))
        return cv

    def probes(self):
        return {"mushrooms": probes.ground_contacts}

    def subject(self, spec, rng):
        n, cap = spec["params"]["mushrooms"], spec["colors"]["cap"]
        if n == 1:
            return f"a {cap} {choose(rng, self.nouns)}"
        return f"{choose(rng, ('a cluster of', 'a group of'))} {num(n, rng)} {cap} mushrooms"

    def features(self, spec, rng):
        p, c = spec["params"], spec["colors"]
        f = [f"{c['stem']} stems" if p["mushrooms"] > 1 else f"a {c['stem']} stem"]
        if p["spots"] and "spots" in c:
            f.append(f"{c['spots']} spots on the cap")
        return f

    def plan(self, spec):
        p = spec["params"]
        what = "A single large mushroom" if p["mushrooms"] == 1 else \
            f"A cluster of {plural(p['mushrooms'], 'mushroom')}, one large and the others small"
        return f"{what}: a short thick stem under a wide dome-shaped cap that overhangs the stem."

    def detail(self, spec):
        p, c = spec["params"], spec["colors"]
        s = f"Cap {c['cap']}, stem {c['stem']}"
        if p["spots"] and "spots" in c:
            s += f", {c['spots']} spots on the cap"
        return s + ". Each mushroom is radially symmetric."
