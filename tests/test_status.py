"""`rl3d status`: done / missing shards and the --array expression that resubmits the missing ones."""
from __future__ import annotations

import json

from click.testing import CliRunner

from rl3d.cli.main import main as cli
from rl3d.stages.status import array_expression


def test_array_expression_is_slurm_syntax():
    assert array_expression([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert array_expression([3]) == "3" and array_expression([]) == ""


def test_status_names_the_missing_shards(tmp_path):
    run = CliRunner()
    out = tmp_path / "run" / "step-000001" / "prompts"
    for i in (0, 2, 4):
        res = run.invoke(cli, ["synth", "--n", "10", "--no-meshes", "--shard", f"{i}/5", "--out", str(out), "--quiet"])
        assert res.exit_code == 0, res.output
    (tmp_path / "run" / "step-000001" / ".policy.rl-tmp").mkdir()  # an rl-step killed mid-write

    res = run.invoke(cli, ["status", str(tmp_path / "run")])
    assert res.exit_code == 3
    lines = res.output.splitlines()
    assert f"{out}  synth  3/5 shards done; missing 1,3; resubmit with --array=1,3" in lines
    assert any(line.endswith("rl-step  0/1 shards done; missing 0 (started, running or killed: 0)") for line in lines)

    res = run.invoke(cli, ["status", str(out), "--json"])
    got = json.loads(res.output)
    assert res.exit_code == 3 and got["missing"] == [1, 3] and got["array"] == "1,3" and not got["complete"]

    for i in (1, 3):
        run.invoke(cli, ["synth", "--n", "10", "--no-meshes", "--shard", f"{i}/5", "--out", str(out), "--quiet"])
    res = run.invoke(cli, ["status", str(out)])
    assert res.exit_code == 0 and res.output.strip() == f"{out}  synth  5/5 shards done"


def test_status_of_a_dir_without_outputs_is_bad_input(tmp_path):
    res = CliRunner().invoke(cli, ["status", str(tmp_path)])
    assert res.exit_code == 2 and "no rl3d stage outputs" in res.output
