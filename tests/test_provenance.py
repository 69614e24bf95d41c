"""Tables know what they were made from: reward refuses renders of other samples, and every stage
output records its own id and its inputs' ids."""
from __future__ import annotations

from click.testing import CliRunner

from rl3d.cli.main import main as cli
from rl3d.formats import tables

GEOMETRY = '[[levels.single]]\nname = "floating_parts"\nbackend = "geometry"\naggregate = "none"\n'


def _ok(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args] + ["--quiet"])
    assert res.exit_code == 0, res.output
    return res


def test_reward_refuses_renders_of_another_run(tmp_path):
    cfg = tmp_path / "geometry.toml"
    cfg.write_text(GEOMETRY)
    for run, seed in (("a", 1), ("b", 2)):
        _ok("synth", "--n", "2", "--seed", seed, "--out", tmp_path / run / "objects")
    _ok("render", "--samples", tmp_path / "a" / "objects", "--out", tmp_path / "a" / "renders", "--views", "1",
        "--resolution", "32", "--supersample", "1")

    res = CliRunner().invoke(cli, ["reward", "--samples", str(tmp_path / "b" / "objects"), "--renders",
                                   str(tmp_path / "a" / "renders"), "--config", str(cfg), "--out",
                                   str(tmp_path / "b" / "rewards")])
    assert res.exit_code == 2 and "was made from another samples table" in res.output
    assert not (tmp_path / "b" / "rewards").exists() or not any((tmp_path / "b" / "rewards").glob("part-*"))

    _ok("reward", "--samples", tmp_path / "a" / "objects", "--renders", tmp_path / "a" / "renders",
        "--config", cfg, "--out", tmp_path / "a" / "rewards")
    objects, renders, rewards = (tables.provenance(tmp_path / "a" / d) for d in ("objects", "renders", "rewards"))
    assert renders.made_from == {"samples": objects.table_id}
    assert rewards.made_from == {"samples": objects.table_id, "renders": renders.table_id}
    assert len({objects.table_id, renders.table_id, rewards.table_id}) == 3
    assert tables.provenance(tmp_path / "b" / "objects").table_id != objects.table_id  # another seed, another id


def test_stage_outputs_read_as_parquet_datasets(tmp_path):
    """Media live in underscore folders, which dataset readers skip: the stage dir is the dataset."""
    import pyarrow.parquet as pq

    _ok("synth", "--n", "3", "--seed", "1", "--out", tmp_path / "objects")
    _ok("render", "--samples", tmp_path / "objects", "--out", tmp_path / "renders", "--views", "2",
        "--resolution", "32", "--supersample", "1")
    assert any((tmp_path / "objects" / "_meshes").glob("*.glb"))
    assert pq.read_table(tmp_path / "objects").num_rows == 3
    assert pq.read_table(tmp_path / "renders").num_rows == 6
