"""--overwrite with bad input fails before it touches a good output."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from rl3d.cli.main import main as cli
from rl3d.formats import shards as shards_io


def test_overwrite_with_bad_input_keeps_the_old_output(tmp_path):
    run = CliRunner()
    objs, out = tmp_path / "objs", tmp_path / "renders"
    assert run.invoke(cli, ["synth", "--n", "2", "--seed", "1", "--out", str(objs), "--quiet"]).exit_code == 0
    args = ["render", "--views", "1", "--resolution", "32", "--out", str(out), "--quiet"]
    assert run.invoke(cli, [*args, "--samples", str(objs)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"sample_id": ["x"]}), bad)  # no mesh_path column
    res = run.invoke(cli, [*args, "--samples", str(bad), "--overwrite"])
    assert res.exit_code == 2 and "bad.parquet" in res.output

    shards_io.check_complete(out)  # still a complete output of the first run
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    res = run.invoke(cli, [*args, "--samples", str(objs), "--json"])
    assert res.exit_code == 0 and '"skipped": true' in res.output
