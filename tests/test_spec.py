"""Spec checker: passes ground truth, fails perturbations; prompt parsing; reward backend."""
import numpy as np

from rl3d.formats.errors import InputError
from rl3d.formats.voxels import color_id
from rl3d.stages.rewards.base import RewardItem
from rl3d.stages.rewards.spec import SpecBackend, check_spec, parse_prompt
from rl3d.stages.shapes import FAMILIES
from rl3d.stages.shapes.world import generate_objects, make_object


def _first(family, pred=lambda o: True, seed=0):
    for i in range(3000):
        o = make_object(i, seed)
        if o.family == family and pred(o):
            return o
    raise AssertionError(family)


def test_ground_truth_passes():
    objs = generate_objects(150, seed=21)
    scores = [check_spec(o.spec, o.grid).score for o in objs]
    assert np.mean([s == 1.0 for s in scores]) >= 0.97
    r = check_spec(objs[0].spec, objs[0].grid)
    assert all(set(c) == {"attribute", "expected", "observed", "passed"} for c in r.checks)


def test_removed_leg_fails():
    o = _first("table", lambda o: o.spec["params"]["legs"] == 4)
    g = o.grid.copy()
    legs = g == color_id(o.spec["colors"]["legs"])
    x = np.argwhere(legs[:, 0, :])[0]
    g[max(0, x[0] - 3):x[0] + 4, :, max(0, x[1] - 3):x[1] + 4][legs[max(0, x[0] - 3):x[0] + 4, :,
                                                                  max(0, x[1] - 3):x[1] + 4]] = 0
    r = check_spec(o.spec, g)
    legs_check = next(c for c in r.checks if c["attribute"] == "legs")
    assert legs_check["observed"] == 3 and not legs_check["passed"] and r.score < 1


def test_changed_colour_fails():
    o = _first("chair")
    g = o.grid.copy()
    seat = color_id(o.spec["colors"]["seat"])
    other = next(c for c in range(1, 17) if c not in np.unique(g))
    g[g == seat] = other
    r = check_spec(o.spec, g)
    c = next(c for c in r.checks if c["attribute"] == "color.seat")
    assert not c["passed"] and r.score < 1


def test_removed_floor_fails():
    o = _first("tower", lambda o: o.spec["params"]["floors"] >= 3)
    p = o.spec["params"]
    fh = p["floor_height"] + 1
    g = np.concatenate([o.grid[:, fh:], np.zeros_like(o.grid[:, :fh])], axis=1)  # drop the first floor
    r = check_spec(o.spec, g)
    c = next(c for c in r.checks if c["attribute"] == "floors")
    assert c["observed"] == p["floors"] - 1 and not c["passed"]


def test_floating_and_empty_grids_fail():
    o = _first("snowman")
    lifted = np.concatenate([np.zeros_like(o.grid[:, :3]), o.grid[:, :-3]], axis=1)
    r = check_spec(o.spec, lifted)
    assert not next(c for c in r.checks if c["attribute"] == "grounded")["passed"]
    assert check_spec(o.spec, np.zeros_like(o.grid)).score == 0.0


def test_parse_prompt_round_trips_captions():
    objs = generate_objects(200, seed=4)
    ok = 0
    for o in objs:
        p = parse_prompt(o.caption)
        assert p is not None, o.caption
        good = (p["family"] == o.family
                and all(o.spec["params"].get(k) == v for k, v in p["params"].items())
                and all(o.spec["colors"].get(k) == v for k, v in p["colors"].items()))
        fam = FAMILIES[o.family]
        good &= all(k in p["params"] for k in fam.counts if k in o.spec["params"] and o.family != "mushroom")
        ok += good
    assert ok / len(objs) >= 0.95
    p = parse_prompt("a red table with four brown legs and a rectangular top")
    assert p["family"] == "table" and p["params"]["legs"] == 4
    assert p["colors"] == {"top": "red", "legs": "brown"}
    p = parse_prompt("a green saguaro cactus with 3 arms and a orange pot")
    assert p["family"] == "cactus" and p["params"]["arms"] == 3 and p["colors"]["pot"] == "orange"


def test_parse_prompt_outside_grammar():
    assert parse_prompt("a photorealistic portrait of an old fisherman at dawn") is None
    assert parse_prompt("") is None


def test_parsed_spec_checks_generated_grid():
    o = _first("table", lambda o: o.spec["params"]["legs"] == 4)
    p = parse_prompt("a " + o.spec["colors"]["top"] + " table with four " + o.spec["colors"]["legs"] + " legs")
    assert check_spec(p, o.grid).score == 1.0
    p["params"]["legs"] = 6
    assert check_spec(p, o.grid).score < 1.0


def test_backend_statuses():
    o = _first("mug")
    be = SpecBackend()
    res = be.score([
        RewardItem("a", o.caption, "single", [], grid=o.grid, spec=o.spec),
        RewardItem("b", o.caption, "single", [], grid=o.grid),
        RewardItem("c", o.caption, "single", [], grid=None, spec=o.spec),
        RewardItem("d", "a sunset over the sea", "single", [], grid=o.grid),
    ])
    assert res[0].status == "ok" and res[0].value == 1.0 and res[0].details["checks"]
    assert res[1].status == "ok" and res[1].value == 1.0
    assert res[2].status == "decode_error" and res[2].value is None
    assert res[3].status == "not_applicable" and res[3].value is None


def test_backend_all_or_nothing_score():
    import pytest

    o = _first("chair")
    g = o.grid.copy()
    seat = color_id(o.spec["colors"]["seat"])
    g[g == seat] = next(c for c in range(1, 17) if c not in np.unique(g))  # one check fails
    items = [RewardItem("right", o.caption, "single", [], grid=o.grid, spec=o.spec),
             RewardItem("one-wrong", o.caption, "single", [], grid=g, spec=o.spec)]
    fraction = SpecBackend().score(items)
    everything = SpecBackend(score="all").score(items)
    assert fraction[0].value == everything[0].value == 1.0
    assert 0.5 < fraction[1].value < 1.0 and everything[1].value == 0.0
    assert everything[1].details["checks"] == fraction[1].details["checks"]
    with pytest.raises(InputError, match="score must be one of fraction, all"):  # one line, exit 2
        SpecBackend(score="most")
