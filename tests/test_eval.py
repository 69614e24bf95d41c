"""rl3d eval end to end on tiny random policies and a tiny CLIP, plus metric computation on
hand-built samples (no gen)."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import helpers as fx

from rl3d.cli.main import main
from rl3d.stages.evaluation import measures as E
from rl3d.stages.evaluation.options import METRIC_GROUPS
from rl3d.stages.eval_sets import load_benchmark


def _grid(x0, x1, y0=0):
    g = np.zeros((32, 32, 32), np.uint8)
    g[x0:x1, y0:y0 + 4, 10:14] = 2
    return g


def _samples(tmp_path):
    imgs = fx.write_pngs(tmp_path / "img", 8, size=40)
    return [
        E.Sample("p1-0-fine", "p1", "organic_forms", "a tulip", "ok", grid=_grid(0, 4), views=imgs[0:2]),
        E.Sample("p1-1-fine", "p1", "organic_forms", "a tulip", "ok", grid=_grid(0, 4), views=imgs[2:4]),
        E.Sample("p2-0-fine", "p2", "rare_entities", "an abacus", "ok", grid=_grid(0, 4, y0=3), views=imgs[4:6]),
        E.Sample("p2-1-fine", "p2", "rare_entities", "an abacus", "decode_error", "empty grid"),
    ]


def test_compute_metrics_values_and_skip_reasons(tmp_path):
    cats = ["organic_forms", "rare_entities"]
    rows, per = E.compute_metrics("A", _samples(tmp_path), cats, METRIC_GROUPS, E.Models(clip_reason="no CLIP"),
                                  references=None)
    got = {(r["category"], r["metric"]): r for r in rows}
    assert got[("all", "decode_failure_rate")]["value"] == pytest.approx(0.25)
    assert got[("rare_entities", "decode_failure_rate")]["value"] == pytest.approx(0.5)
    assert got[("organic_forms", "diversity_iou")]["value"] == 1.0           # identical samples
    assert got[("rare_entities", "diversity_iou")]["status"] == "skipped"    # one decoded sample
    assert got[("all", "grounded_rate")]["value"] == pytest.approx(2 / 3)   # p2-0 floats 3 layers up
    assert got[("all", "grounded_rate")]["n"] == 3
    # metrics without inputs: skipped with a reason, never a value
    for m, why in [("clip_score", "no CLIP"), ("kd_x100", "no feature model"), ("fd", "no feature model"),
                   ("spec_accuracy", "no specs"), ("reference_iou", "no ground-truth grids")]:
        r = got[("all", m)]
        assert r["status"] == "skipped" and r["value"] is None and why in r["message"]
    assert {p["sample_id"] for p in per} == {s.sample_id for s in _samples(tmp_path)}


def test_compute_metrics_kd_fd_clip_with_references(tmp_path):
    from rl3d.stages.scoring.clip_scorer import ClipScorer
    from rl3d.stages.scoring.metrics import FeatureModel

    d = fx.make_tiny_clip(tmp_path / "clip")
    models = E.Models(clip=ClipScorer(d), features=FeatureModel.load(d))
    samples = _samples(tmp_path)
    refs = {"p1": fx.write_pngs(tmp_path / "r1", 3, seed=5), "p2": fx.write_pngs(tmp_path / "r2", 3, seed=6)}
    rows, per = E.compute_metrics("A", samples, ["organic_forms", "rare_entities"], ("clip", "kd", "fd"), models, refs)
    got = {(r["category"], r["metric"]): r for r in rows}
    assert got[("all", "kd_x100")]["status"] == "ok" and got[("all", "kd_x100")]["n"] == 6
    assert got[("all", "fd")]["value"] >= 0 and got[("all", "fd")]["feature_model"].startswith("clip:")
    # rare_entities has 2 generated views (one sample decoded): enough for KD
    assert got[("rare_entities", "kd_x100")]["status"] == "ok"
    clip = [p["clip_score"] for p in per if "clip_score" in p]
    assert len(clip) == 3 and got[("all", "clip_score")]["value"] == pytest.approx(np.mean(clip))
    # the paper's eval-script KD: only on request, a row of its own beside KD, from the same features
    assert ("all", "kd_paper") not in got
    paper = {(r["category"], r["metric"]): r for r in
             E.compute_metrics("A", samples, ["organic_forms", "rare_entities"], ("kd", "kd_paper"), models, refs)[0]}
    assert paper[("all", "kd_paper")]["status"] == "ok" and 0 < paper[("all", "kd_paper")]["value"] <= 1
    assert paper[("all", "kd_x100")]["value"] == pytest.approx(got[("all", "kd_x100")]["value"])
    # a set against itself: KD ~ 0 relative to a different set
    same = E.compute_metrics("A", samples[:1], ["organic_forms"], ("kd",), models,
                             {"p1": samples[0].views + samples[1].views})[0]
    assert np.isfinite(same[0]["value"])


def test_benchmarks_shipped_and_user_file(tmp_path):
    text = load_benchmark("text-reasoning")
    assert len(text.prompts) >= 240 and len(text.categories) == 6
    assert all(sum(r["category"] == c for r in text.prompts) >= 40 for c in text.categories)
    synth = load_benchmark("synth-reasoning")
    assert synth.has_specs and all(json.loads(r["spec"])["family"] for r in synth.prompts)
    assert all(sum(r["category"] == c for r in synth.prompts) == 40 for c in synth.categories)
    assert load_benchmark("synth-reasoning").content_hash() == synth.content_hash()  # deterministic
    assert synth.reference_grid(synth.prompts[0]).any()
    ref = tmp_path / "refs" / "chair"
    fx.write_pngs(ref, 2)
    f = tmp_path / "bench.json"
    f.write_text(json.dumps([{"prompt": "a chair", "category": "x", "reference_dir": "refs/chair"},
                             {"prompt": "a lamp"}]))
    b = load_benchmark(str(f))
    assert b.prompts[0]["reference_dir"] == str(ref.resolve()) and b.prompts[1]["category"] == "uncategorized"
    (tmp_path / "bad.csv").write_text("prompt,reference_dir\na cup,nowhere\n")
    from rl3d.formats.errors import InputError

    with pytest.raises(InputError, match="bad.csv: row 1: reference_dir"):
        load_benchmark(str(tmp_path / "bad.csv"))


@pytest.mark.filterwarnings("ignore")
def test_cli_eval_two_policies_end_to_end(tmp_path):
    a = fx.make_tiny_policy(tmp_path / "pa" / "base", seed=0)
    b = fx.make_tiny_policy(tmp_path / "pb" / "tuned", seed=1, mode="flat")
    clip = fx.make_tiny_clip(tmp_path / "clip")
    out = tmp_path / "ev"
    args = ["eval", "--bench", "synth-reasoning", "--policy", str(a), "--policy", str(b), "--out", str(out),
            "--limit", "1", "--samples-per-prompt", "2", "--views", "2", "--resolution", "32",
            "--clip-model", str(clip), "--workers", "1", "--json", "--quiet"]
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread spin-up costs more than it saves on a shared 2-core box
    try:
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        t = pq.read_table(out / "metrics").to_pylist()
        parts = sorted((out / "base" / "gen").glob("part-*.parquet")) + sorted((out / "base" / "renders").glob("part-*"))
        stamps = [f.stat().st_mtime_ns for f in parts]
        res2 = CliRunner().invoke(main, args)  # rerun: gen/render complete -> skipped, same numbers
    finally:
        torch.set_num_threads(threads)
    summary = json.loads(res.output[res.output.index('{"'):])
    assert summary["policies"] == ["base", "tuned"]
    cats = load_benchmark("synth-reasoning", limit=1).categories
    for p in ("base", "tuned"):
        got = {(r["category"], r["metric"]): r for r in t if r["policy"] == p}
        for c in ["all", *cats]:
            assert got[(c, "decode_failure_rate")]["status"] == "ok"
            assert got[(c, "kd_x100")]["status"] in ("ok", "skipped")
        assert got[("all", "kd_x100")]["status"] == "ok"   # references = renders of the ground truth
        assert got[("all", "clip_score")]["status"] == "ok"
    modes = {r["policy"]: r["policy_id"] for r in t}
    assert modes["tuned"] != modes["base"]
    assert (out / "tuned" / "gen").is_dir() and (out / "references" / "renders").is_dir()
    levels = {r["level"] for r in pq.read_table(out / "tuned" / "final_samples.parquet").to_pylist()}
    assert levels == {"single"}                                 # flat policy (its meta says so)
    html = (out / "report.html").read_text()
    for needle in ["base", "tuned", *cats, "Δ tuned"]:
        assert needle in html
    assert res2.exit_code == 0, res2.output
    assert [f.stat().st_mtime_ns for f in parts] == stamps and len(parts) == 2
    t2 = pq.read_table(out / "metrics").to_pylist()
    assert [r["value"] for r in t2] == [r["value"] for r in t]


def test_cli_bad_inputs_exit_2(tmp_path):
    r = CliRunner().invoke(main, ["eval", "--bench", "nope", "--policy", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "not a shipped benchmark" in r.output
    r = CliRunner().invoke(main, ["eval", "--bench", "text-reasoning", "--policy", str(tmp_path), "--out",
                                  str(tmp_path / "o"), "--metrics", "clip,bogus"])
    assert r.exit_code == 2 and "bogus" in r.output


def _lift(grid, k):
    out = np.zeros_like(grid)
    out[:, k:] = grid[:, :-k]
    return out


def test_spec_metrics_on_ground_truth_and_wrong_grids():
    b = load_benchmark("synth-reasoning", limit=1)
    gt = [E.Sample(r["prompt_id"] + "-0-fine", r["prompt_id"], r["category"], r["prompt"], "ok",
                   grid=b.reference_grid(r), spec=json.loads(r["spec"])) for r in b.prompts]
    wrong = [E.Sample(s.sample_id[:-7] + "-1-fine", s.prompt_id, s.category, s.prompt, "ok",
                      grid=_lift(s.grid, 6), spec=s.spec) for s in gt]   # lifted off the ground
    failed = [E.Sample(gt[0].prompt_id + "-2-fine", gt[0].prompt_id, gt[0].category, "", "decode_error", spec=gt[0].spec)]
    rows, _ = E.compute_metrics("A", gt, b.categories, ("spec",), E.Models(), None)
    got = {(r["category"], r["metric"]): r for r in rows}
    assert got[("all", "spec_accuracy")]["value"] == 1.0 and got[("all", "spec_all_correct")]["value"] == 1.0
    assert got[("all", "spec_accuracy:grounded")]["value"] == 1.0
    rows, _ = E.compute_metrics("A", gt + wrong + failed, b.categories, ("spec",), E.Models(), None)
    got = {(r["category"], r["metric"]): r for r in rows}
    assert got[("all", "spec_accuracy:grounded")]["value"] == pytest.approx(0.5)
    assert got[("all", "spec_all_correct")]["value"] == pytest.approx(len(gt) / (2 * len(gt) + 1))
    assert "1 undecodable samples count as 0" in got[("all", "spec_accuracy")]["message"]
