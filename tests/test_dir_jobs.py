"""Commands whose output is one directory (codec build, train-scorer, ...) run as DirJobs of the stage
contract: skip on the same config, refuse another config, --overwrite redoes, the directory lands
whole by a rename (a killed run's temp is swept), a non-empty --out that is not complete is refused."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from rl3d.cli.main import main
from rl3d.formats.codec import VoxelCodec
from rl3d.formats.errors import InputError
from rl3d.stages.contract import DirJob, StageOptions

from helpers import random_shapes


def invoke(*args: str):
    return CliRunner().invoke(main, [*args, "--quiet"])


@pytest.fixture
def small_world(monkeypatch):
    """codec build over a few test shapes instead of synth objects (the build itself is what is tested)."""
    from rl3d.stages import codec as stages_codec

    monkeypatch.setattr(stages_codec, "synth_grids", lambda n, seed, split: random_shapes(n, seed + (split == "eval")))


def test_codec_build_skips_refuses_another_config_and_overwrites(small_world, tmp_path):
    out = tmp_path / "cb"
    build = ["codec", "build", "--n", "20", "--patterns", "7", "--eval-n", "4", "--out", str(out)]
    first = json.loads(invoke(*build, "--json").stdout)
    assert first["skipped"] is False and first["vocab_size"] == 1 + 7 * 16
    recorded = json.loads((out / "codec.json").read_text())["config"]
    assert recorded == {"stage": "codec-build", "n": 20, "patterns": 7, "eval_n": 4, "seed": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["cb"]  # no temp dir left beside it

    again = json.loads(invoke(*build, "--json").stdout)
    assert again["skipped"] is True and again["out"] == str(out)

    other = invoke("codec", "build", "--n", "20", "--patterns", "9", "--eval-n", "4", "--out", str(out))
    assert other.exit_code == 2 and len(other.stderr.strip().splitlines()) == 1
    assert str(out / "codec.json") in other.stderr and "patterns 7 -> 9" in other.stderr
    assert "--overwrite" in other.stderr

    redo = json.loads(invoke("codec", "build", "--n", "20", "--patterns", "9", "--eval-n", "4", "--out", str(out),
                             "--overwrite", "--json").stdout)
    assert redo["skipped"] is False and VoxelCodec.load(out).n_patterns == 9


def test_codec_build_sweeps_a_killed_runs_temp_and_refuses_a_foreign_dir(small_world, tmp_path):
    out = tmp_path / "cb"
    stale = tmp_path / ".cb.codec-build.tmp"  # what a killed build leaves: never taken for output
    stale.mkdir()
    (stale / "codebook.npz").write_bytes(b"half")
    assert invoke("codec", "build", "--n", "10", "--patterns", "3", "--eval-n", "0", "--out", str(out)).exit_code == 0
    assert not stale.exists() and VoxelCodec.load(out).n_patterns == 3

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    res = invoke("codec", "build", "--n", "10", "--patterns", "3", "--eval-n", "0", "--out", str(foreign))
    assert res.exit_code == 2 and f"{foreign}: exists and is not a codebook; use --overwrite" in res.stderr
    assert (foreign / "todo.txt").read_text() == "keep me"


class Failing(DirJob):
    stage, marker, what = "failing", "done.json", "a result"

    def config(self) -> dict:
        return {"stage": self.stage}

    def build(self, into, opts, progress):
        (into / "half.bin").write_bytes(b"x")
        raise InputError("row 3: bad")


def test_a_failed_build_leaves_the_old_output_and_no_temp(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "done.json").write_text("{}")
    with pytest.raises(InputError, match="row 3"):
        Failing().run(StageOptions(out=out, overwrite=True, quiet=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "done.json").read_text() == "{}"


def test_train_scorer_trains_records_its_config_and_skips(tmp_path):
    objs, renders, out = tmp_path / "objs", tmp_path / "renders", tmp_path / "scorer"
    assert invoke("synth", "--n", "12", "--seed", "2", "--out", str(objs)).exit_code == 0
    assert invoke("render", "--samples", str(objs), "--views", "2", "--resolution", "32", "--workers", "1",
                  "--no-sheet", "--out", str(renders)).exit_code == 0
    args = ["train-scorer", "--objects", str(objs), "--renders", str(renders), "--out", str(out), "--steps", "2",
            "--batch-size", "4", "--device", "cpu"]
    s = json.loads(invoke(*args, "--json").stdout)
    assert s["skipped"] is False and s["steps"] == 2 and 0 <= s["eval_top1_of_16"] <= 1
    info = json.loads((out / "scorer.json").read_text())
    assert info["config"]["steps"] == 2 and info["config"]["renders"] == str(renders.resolve())
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".scorer*"))
    assert json.loads(invoke(*args, "--json").stdout)["skipped"] is True
    res = invoke(*args[:-4], "--batch-size", "2", "--device", "cpu")
    assert res.exit_code == 2 and "batch_size 4 -> 2" in res.stderr
