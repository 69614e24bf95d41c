from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import helpers as fx

from rl3d.stages.scoring import report
from rl3d.stages.evaluation.rows import metric_row

CATS = ["spatial_structural", "organic_forms"]


def _rows():
    # base: A; B improves CLIP and KD, worsens FD; diversity has no better direction
    vals = {"A": {"clip_score": 20.0, "kd_x100": 0.50, "fd": 10.0, "diversity_iou": 0.4},
            "B": {"clip_score": 25.0, "kd_x100": 0.30, "fd": 12.0, "diversity_iou": 0.3}}
    rows = []
    for p, ms in vals.items():
        for c in ["all", *CATS]:
            for m, v in ms.items():
                rows.append(metric_row(p, c, m, v + (1.0 if c == "organic_forms" and p == "B" and m == "clip_score" else 0), 8))
        rows += [metric_row(p, c, "spec_accuracy", status="skipped", message="spec accuracy skipped: no specs")
                 for c in ["all", *CATS]]
    return rows


def test_delta_table_signs():
    t = {m: report.delta_table(_rows(), m, ["A", "B"], CATS) for m in ("clip_score", "kd_x100", "fd", "diversity_iou")}
    clip = {r["category"]: r for r in t["clip_score"]}
    assert clip["all"]["deltas"]["B"] == pytest.approx(5.0) and clip["all"]["better"]["B"] is True
    assert clip["organic_forms"]["deltas"]["B"] == pytest.approx(6.0)
    assert t["kd_x100"][0]["deltas"]["B"] == pytest.approx(-0.2) and t["kd_x100"][0]["better"]["B"] is True
    assert t["fd"][0]["deltas"]["B"] == pytest.approx(2.0) and t["fd"][0]["better"]["B"] is False
    assert t["diversity_iou"][0]["better"]["B"] is None
    assert [r["category"] for r in t["clip_score"]] == ["all", *CATS]
    assert report.delta_table(_rows(), "spec_accuracy", ["A", "B"], CATS) == []  # skipped everywhere: no table


def test_report_files_contain_policies_categories_and_reasons(tmp_path):
    imgs = fx.write_pngs(tmp_path / "img", 6, size=64)
    run = tmp_path / "run_metrics.parquet"
    pq.write_table(pa.table({"step": [0, 1, 2, 0, 1, 2], "name": ["reward/total"] * 3 + ["kl"] * 3,
                             "value": [0.1, 0.3, 0.4, 0.0, 0.01, 0.02]}), run)
    grid = report.pick_grid([{"prompt_id": "p1", "prompt": "a red chair", "category": CATS[0]},
                          {"prompt_id": "p2", "prompt": "a tulip", "category": CATS[1]}],
                         {"A": {"p1": imgs[:3], "p2": imgs[3:]}, "B": {"p1": imgs[:3]}}, {"p1": imgs[:2]}, 4)
    assert [g["prompt_id"] for g in grid] == ["p1", "p2"]
    ctx = report.ReportContext("toy", "hand-made", "abc", CATS,
                            [{"name": "A", "policy_id": "/x/A@1111#step0", "mode": "hi-grpo", "final_level": "fine"},
                             {"name": "B", "policy_id": "/x/B@2222#step5", "mode": "flat", "final_level": "single"}],
                            notes=["a note"], config={"seed": 0}, grid=grid, runs=[str(run)])
    files = report.write_report(_rows(), tmp_path / "out", ctx)
    md, page = files["report_md"].read_text(), files["report_html"].read_text()
    for text in (md, page):
        for needle in ["A", "B", "/x/B@2222#step5", *CATS, "spec accuracy skipped: no specs", "+5.000"]:
            assert needle in text
    assert "▲" in md and "▼" in md
    assert "class='worse'" in page and "class='better'" in page
    assert page.count("data:image/png;base64,") >= 5  # charts + grid + 2 curves, embedded
    plots = tmp_path / "out" / "plots"
    for name in ("bar-clip_score.png", "bar-kd_x100.png", "grid.png", "curve-reward_total.png", "curve-kl.png"):
        with Image.open(plots / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert not (plots / "bar-spec_accuracy.png").exists()  # nothing to plot for a skipped metric


def test_learning_run_plot_from_shipped_run_data(tmp_path):
    """`learning_summary plot` draws the four learning charts from a run's metrics and held-out
    scores (here the H100 run data kept in docs/data)."""
    import shutil

    from PIL import Image

    from rl3d.stages.scoring.learning import plot_runs

    data = Path(__file__).resolve().parents[1] / "docs" / "data"
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(data / "h100_lr1e-4_metrics.parquet", run / "metrics.parquet")
    shutil.copy(data / "h100_lr1e-4_heldout.json", run / "heldout_rewards.json")
    out = plot_runs(tmp_path / "curves.png", {"lr 1e-4": run})
    img = Image.open(out)
    assert img.size == (1800, 720)
    assert not (tmp_path / "curves.parts").exists()
    # not a blank sheet: the two held-out levels are drawn as coloured lines
    colours = {px for px in img.convert("RGB").getdata() if px[0] != px[1] or px[1] != px[2]}
    assert len(colours) >= 2


def test_reward_variance_shares_follow_the_term_that_varies():
    from rl3d.stages.scoring.learning import reward_variance_shares

    rows = []
    for i, (a, b) in enumerate([(1.0, 0.5), (2.0, 0.5), (3.0, 0.5), (4.0, 0.5)]):  # only term a varies
        rows.append({"prompt_id": "p", "level": "fine", "total": a + b, "a": a, "b": b})
    for i in range(3):  # a group without spread carries no signal
        rows.append({"prompt_id": "q", "level": "fine", "total": 1.0, "a": 0.5, "b": 0.5})
    rows.append({"prompt_id": "r", "level": "fine", "total": None, "a": None, "b": None})  # failed row
    assert reward_variance_shares(rows) == {("fine", "a"): pytest.approx(1.0), ("fine", "b"): pytest.approx(0.0)}


def _write_eval_rewards(out, totals):
    """A held-out rewards table: totals = {sample_id: total or None}."""
    import pyarrow as pa

    from rl3d.formats import shards, tables

    ids = list(totals)
    t = pa.table({"sample_id": ids, "prompt_id": [i.rsplit("-", 2)[0] for i in ids],
                  "sample_index": pa.array([int(i.rsplit("-", 2)[1]) for i in ids], pa.int32()),
                  "level": [i.rsplit("-", 1)[1] for i in ids], "total": pa.array(list(totals.values()), pa.float64()),
                  "status": ["ok" if v is not None else "decode_error" for v in totals.values()],
                  "message": [""] * len(ids)})
    shards.write_part(tables.with_metadata(t, "rewards"), out, shards.Shard(0, 1))
    shards.finish(out, "reward", {}, shards.Shard(0, 1), {})


def test_before_after_sheet_shows_the_most_changed_prompts(tmp_path):
    import pyarrow as pa

    from rl3d.formats import shards, tables
    from rl3d.stages.scoring.learning import before_after_sheet

    change = {"up": 1.0, "same": 0.0, "down": -1.0, "flat": 0.1}
    for step, sign in ((0, 0.0), (10, 1.0)):
        seed = tmp_path / "eval" / f"step-{step:06d}" / "seed-101"
        totals = {f"{p}-{k}-fine": 2.0 + sign * d for p, d in change.items() for k in range(2)}
        totals["down-1-fine"] = None if step else 2.0  # a sample that failed after training
        _write_eval_rewards(seed / "rewards", totals)
        (seed / "renders").mkdir(parents=True)
        paths = [str(seed / "renders" / f"{sid}.png") for sid in totals]
        for path in paths:
            Image.new("RGB", (32, 32), (200, 30, 30) if step else (30, 30, 200)).save(path)
        t = pa.table({"sample_id": list(totals), "view": pa.array([0] * len(totals), pa.int32()),
                      "azimuth": pa.array([0.0] * len(totals), pa.float32()),
                      "elevation": pa.array([0.0] * len(totals), pa.float32()), "image_path": paths,
                      "status": ["ok"] * len(totals), "message": [""] * len(totals),
                      "prompt": [f"a {i.split('-')[0]} thing" for i in totals]})
        shards.write_part(tables.with_metadata(t, "renders"), seed / "renders", shards.Shard(0, 1))
    out = tmp_path / "sheet.png"
    shown = before_after_sheet(tmp_path, 0, 10, out, n_prompts=4, per_prompt=2, tile=32)
    assert shown[0] == "up" and shown[-1] == "down" and set(shown) == set(change)
    img = Image.open(out).convert("RGB")
    assert img.size == (2 * 2 * 32 + 40, 4 * (32 + 34) + 30)
    assert img.getpixel((10, 30 + 14 + 20)) == (30, 30, 200)            # step 0 on the left
    assert img.getpixel((2 * 32 + 40 + 10, 30 + 14 + 20)) == (200, 30, 30)  # step 10 on the right


def test_heldout_table_reports_failed_share_beside_the_scored_mean(tmp_path):
    """Held-out summary: mean and seed spread over scored samples; empty meshes counted apart."""
    import pyarrow as pa

    from rl3d.formats import shards, tables
    from rl3d.stages.scoring.learning import heldout_table

    for seed, fine in (("101", [2.0, None]), ("102", [3.0, 1.0])):
        rows = {"sample_id": ["a-0-coarse", "a-1-coarse", "a-0-fine", "a-1-fine"], "prompt_id": ["a"] * 4,
                "sample_index": [0, 1, 0, 1], "level": ["coarse"] * 2 + ["fine"] * 2,
                "total": [1.0, 1.0] + fine, "status": ["ok"] * 3 + ["ok" if fine[1] else "decode_error"],
                "message": [""] * 4, "spec_raw": [0.5, 0.5, 1.0, 1.0 if fine[1] else None]}
        t = tables.with_metadata(pa.table(rows).cast(pa.schema([
            ("sample_id", pa.string()), ("prompt_id", pa.string()), ("sample_index", pa.int32()),
            ("level", pa.string()), ("total", pa.float64()), ("status", pa.string()), ("message", pa.string()),
            ("spec_raw", pa.float64())])), "rewards")
        out = tmp_path / "eval" / "step-000004" / f"seed-{seed}" / "rewards"
        shards.write_part(t, out, shards.Shard(0, 1))
        shards.finish(out, "reward", {}, shards.Shard(0, 1), {})
    # a seed whose scoring was cut off (1 of 2 shards finished) is left out, not read
    cut = tmp_path / "eval" / "step-000004" / "seed-103" / "rewards"
    shards.write_part(t, cut, shards.Shard(0, 2))
    shards.finish(cut, "reward", {}, shards.Shard(0, 2), {})
    (row,) = heldout_table(tmp_path)
    assert row["step"] == 4 and row["seeds"] == 2
    assert row["total_fine"] == pytest.approx((2.0 + 2.0) / 2)          # seed means 2.0 and 2.0
    assert row["failed_fine"] == pytest.approx(0.25) and row["failed_coarse"] == 0.0
    assert row["failed_fine_seed_std"] == pytest.approx(0.25)
    assert row["spec_fine"] == pytest.approx(1.0)


def test_paired_prompt_change_pairs_by_prompt_and_skips_failed_samples():
    from rl3d.stages.scoring.learning import paired_prompt_change

    def rows(totals):  # prompt -> fine totals of its samples (None = failed)
        return [{"prompt_id": p, "level": "fine", "total": t} for p, ts in totals.items() for t in ts]

    a = rows({"easy": [3.0, 3.0], "hard": [1.0, 1.2], "gone": [2.0]})
    b = rows({"easy": [3.1, None], "hard": [1.2, 1.4]})   # +0.1 and +0.2; "gone" has no B
    c = paired_prompt_change(a, b, "fine", n_boot=200)
    assert c["prompts"] == 2 and c["improved"] == 2
    assert c["change"] == pytest.approx(0.15)
    assert 0.1 - 1e-9 <= c["ci_low"] <= c["change"] <= c["ci_high"] <= 0.2 + 1e-9
    assert paired_prompt_change(a, b, "coarse")["prompts"] == 0


def test_learning_summary_is_an_rl3d_subcommand(tmp_path):
    """`rl3d learning-summary heldout RUN` writes RUN/heldout_rewards.json and prints the table;
    a bad LABEL=DIR is a one-line error with exit code 2."""
    import json

    from click.testing import CliRunner

    from rl3d.cli.main import main

    out = tmp_path / "eval" / "step-000002" / "seed-101" / "rewards"
    _write_eval_rewards(out, {"a-0-coarse": 1.0, "a-1-coarse": 2.0, "a-0-fine": 3.0, "a-1-fine": None})
    r = CliRunner().invoke(main, ["learning-summary", "heldout", str(tmp_path)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].split()[:3] == ["step", "total_coarse", "failed_coarse"]
    assert lines[1].split()[:3] == ["2", "1.5000", "0.0000"]
    (row,) = json.loads((tmp_path / "heldout_rewards.json").read_text())
    assert row["total_fine"] == 3.0 and row["failed_fine"] == 0.5
    r = CliRunner().invoke(main, ["learning-summary", "plot", "--out", str(tmp_path / "x.png"), "nolabel"])
    assert r.exit_code == 2 and "expected LABEL=DIR" in r.output
    assert "learning-summary" in CliRunner().invoke(main, ["--help"]).output


def test_learning_summary_without_held_out_scores_says_so(tmp_path):
    """A run with rl-step metrics but no held-out scores (the demo's): `heldout` and `plot` are one
    line each naming what is missing and how it is made, exit code 2, and nothing is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from rl3d.cli.main import main

    run = tmp_path / "demo"
    run.mkdir()
    pq.write_table(pa.table({"step": [1, 2], "name": ["reward_mean_fine"] * 2, "value": [0.1, 0.2]}),
                   run / "metrics.parquet")
    r = CliRunner().invoke(main, ["learning-summary", "heldout", str(run)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "no held-out scores" in r.output and "examples/learning_run.sh" in r.output
    assert not (run / "heldout_rewards.json").exists()
    r = CliRunner().invoke(main, ["learning-summary", "plot", "--out", str(tmp_path / "c.png"), f"demo={run}"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "no heldout_rewards.json" in r.output and "learning-summary heldout" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "c.png").exists()
    r = CliRunner().invoke(main, ["learning-summary", "plot", "--out", str(tmp_path / "c.png"),
                                  f"x={tmp_path / 'nowhere'}"])
    assert r.exit_code == 2 and "no metrics.parquet" in r.output


def test_few_samples_are_flagged_and_n1_deltas_get_no_verdict(tmp_path):
    """A value from fewer than 8 samples is marked with a visible note; with n = 1 a delta is shown
    but not called better or worse; the policies table shows each policy's SFT and RL step (an eval
    record of before `sft_step` names the SFT step `step`)."""
    rows = []
    for p, v, n in (("A", 20.0, 1), ("B", 25.0, 1)):
        rows += [metric_row(p, c, "clip_score", v, n) for c in ["all", *CATS]]
    for p, v in (("A", 0.5), ("B", 0.3)):
        rows += [metric_row(p, c, "kd_x100", v, 40) for c in ["all", *CATS]]
    t = report.delta_table(rows, "clip_score", ["A", "B"], CATS)
    assert t[0]["deltas"]["B"] == pytest.approx(5.0) and t[0]["better"]["B"] is None
    assert report.delta_table(rows, "kd_x100", ["A", "B"], CATS)[0]["better"]["B"] is True
    ctx = report.ReportContext("toy", "hand-made", "abc", CATS,
                               [{"name": "A", "policy_id": "a", "mode": "hi-grpo", "final_level": "fine", "step": 300,
                                 "rl_step": 0},
                                {"name": "B", "policy_id": "b", "mode": "hi-grpo", "final_level": "fine",
                                 "sft_step": 300, "rl_step": 12}])
    files = report.write_report(rows, tmp_path / "out", ctx)
    md, page = files["report_md"].read_text(), files["report_html"].read_text()
    assert "| A | hi-grpo (fine) | 300 | 0 |" in md and "| B | hi-grpo (fine) | 300 | 12 |" in md
    assert "<th>RL step</th>" in page and "<td>12</td>" in page
    for text in (md, page):
        assert "Few samples" in text and "fewer than 8 samples" in text
        assert "20.00†" in text and "+5.000" in text
        assert "-0.200 ▲" in text                       # KD (n = 40): lower is better
        assert "+5.000 ▲" not in text and "+5.000 ▼" not in text and "+5.000" in text  # CLIP (n = 1): no verdict
    assert "class='few'" in page


def test_no_few_samples_note_when_every_value_has_enough(tmp_path):
    ctx = report.ReportContext("toy", "hand-made", "abc", CATS,
                               [{"name": "A", "policy_id": "a", "mode": "hi-grpo", "final_level": "fine"},
                                {"name": "B", "policy_id": "b", "mode": "flat", "final_level": "single"}])
    files = report.write_report(_rows(), tmp_path / "out", ctx)
    assert "Few samples" not in files["report_md"].read_text()


def test_training_curves_name_the_run_and_put_changing_rewards_first(tmp_path):
    """A run's legend is its folder's name (also when given the metrics.parquet file); reward curves
    come first and a metric that never moves comes after every one that does, so the chart limit
    drops it rather than reward_mean_fine."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rl3d.stages.scoring import report

    run = tmp_path / "demo"
    run.mkdir()
    names = ["clip_high_frac", "clip_low_frac", "kl", "loss", "reward_mean_coarse", "reward_mean_fine"]
    rows = [(s, n, 0.0 if n.startswith("clip") else s * (i + 1)) for s in (1, 2) for i, n in enumerate(names)]
    pq.write_table(pa.table({"step": [r[0] for r in rows], "name": [r[1] for r in rows],
                             "value": [float(r[2]) for r in rows]}), run / "metrics.parquet")
    assert report.run_label(run / "metrics.parquet") == report.run_label(run) == "demo"
    paths = report.curve_charts([str(run / "metrics.parquet")], tmp_path / "plots", max_charts=4)
    assert [p.name for p in paths] == ["curve-reward_mean_coarse.png", "curve-reward_mean_fine.png",
                                       "curve-kl.png", "curve-loss.png"]
    two = report.curve_charts([str(run), str(run / "metrics.parquet")], tmp_path / "plots2", max_charts=1)
    assert len(two) == 1  # two runs of one folder name: two lines ("demo", "demo'"), one chart


def test_line_panel_without_values_says_so_and_each_tick_carries_its_scale():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from rl3d.stages.scoring.charts import draw_lines

    fig = Figure()
    FigureCanvasAgg(fig)
    empty, tiny = fig.subplots(1, 2)
    draw_lines(empty, "entropy", {})
    draw_lines(tiny, "kl", {"a": ([1, 2, 3], [1e-5, 3e-5, 2e-5])})
    fig.canvas.draw()
    assert [t.get_text() for t in empty.texts] == ["not recorded in these runs"]
    assert len(tiny.texts) == 0 and tiny.get_legend() is not None
    assert tiny.yaxis.get_offset_text().get_text() == ""  # no shared "1e-5" above the axis, under the title
    assert "3e-05" in [t.get_text() for t in tiny.get_yticklabels()]
