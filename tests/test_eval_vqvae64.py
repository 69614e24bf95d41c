"""rl3d eval end to end on a policy whose codec is the 64^3 VQ-VAE: a tiny random Qwen2.5-VL with the
mesh tokens added after its specials and a reduced-size VQ-VAE replica referenced by path (the
builders of tests/helpers.py), a tiny CLIP, one benchmark prompt. Checks the report's rows."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import helpers as fx

from rl3d.cli.main import main
from rl3d.formats import tables
from rl3d.stages.eval_sets import load_benchmark


@pytest.mark.filterwarnings("ignore")
def test_eval_of_a_vqvae64_policy_end_to_end(tmp_path):
    fx.save_codec(tmp_path / "vqvae")
    policy = fx.save_replica(tmp_path / "vq", tmp_path / "vqvae", fx.qwen_like_tokenizer(16))
    clip = fx.make_tiny_clip(tmp_path / "clip")
    out = tmp_path / "ev"
    args = ["eval", "--bench", "synth-reasoning", "--policy", str(policy), "--out", str(out), "--limit", "1",
            "--samples-per-prompt", "2", "--views", "1", "--resolution", "24", "--clip-model", str(clip),
            "--workers", "1", "--device", "cpu", "--json", "--quiet"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(main, args)
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, (res.output, "".join(__import__("traceback").format_exception(*res.exc_info)) if res.exc_info else "")
    summary = json.loads(res.output[res.output.index('{"'):])
    bench = load_benchmark("synth-reasoning", limit=1)  # one prompt per category
    assert summary["policies"] == ["vq"] and summary["prompts"] == len(bench.prompts)

    rows = pq.read_table(out / "metrics").to_pylist()
    cats = bench.categories
    got = {(r["category"], r["metric"]): r for r in rows}
    assert {r["policy"] for r in rows} == {"vq"} and len(got) == len(rows)  # one row per (category, metric)
    for c in ["all", *cats]:
        row = got[(c, "decode_failure_rate")]
        assert row["status"] == "ok" and row["n"] == (2 * len(cats) if c == "all" else 2), row
        assert 0.0 <= row["value"] <= 1.0
    # the 64^3 samples against the benchmark's 32^3 ground truth (a broadcast error before)
    iou = got[("all", "reference_iou")]
    assert iou["status"] == "ok" and 0.0 <= iou["value"] <= 1.0, iou
    assert got[("all", "clip_score")]["status"] in ("ok", "skipped")
    for r in rows:  # every row is a number or says why not
        assert (r["status"] == "ok") == (r["value"] is not None), r
        assert r["status"] == "ok" or r["message"], r

    final = pq.read_table(out / "vq" / "final_samples.parquet").to_pylist()
    assert len(final) == 2 * len(bench.prompts) and {r["level"] for r in final} == {"fine"}
    assert tables.table_config(out / "vq" / "gen")["codec"] == str((tmp_path / "vqvae").resolve())  # the policy's codec
    assert "vq" in (out / "report.html").read_text()
