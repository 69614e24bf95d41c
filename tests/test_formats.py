"""The on-disk contracts: table schemas, atomic shard writes, manifests, prompt files."""
import json
import multiprocessing as mp
import os
import signal
import time

import click
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rl3d.cli.common import handle_errors, pop_stage_options, report, stage_options
from rl3d.formats import shards, tables
from rl3d.formats.errors import InputError
from rl3d.formats.prompts import prompt_hash, read_prompts
from rl3d.stages.contract import StageOptions, run_stage


def _metrics_table(n=3):
    return pa.table({"name": [f"m{i}" for i in range(n)], "value": [float(i) for i in range(n)]})


def test_schema_roundtrip_keeps_kind_version_and_config(tmp_path):
    t = tables.with_metadata(_metrics_table(), "metrics", config={"a": 1}, policy="pol@abc#step3")
    shards.write_part(t, tmp_path, shards.Shard(0, 1))
    back = tables.read_table(tmp_path, "metrics")
    assert back.column("value").to_pylist() == [0.0, 1.0, 2.0]
    meta = back.schema.metadata
    assert meta[b"rl3d.table"] == b"metrics" and meta[b"rl3d.version"] == b"1"
    assert tables.table_config(tmp_path) == {"a": 1}
    assert tables.table_policy(tmp_path) == "pol@abc#step3"


def test_missing_and_mistyped_columns_name_file_and_column(tmp_path):
    f = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"name": ["x"]}), f)
    with pytest.raises(InputError, match=r"bad\.parquet: missing column 'value'"):
        tables.read_table(f, "metrics")
    pq.write_table(pa.table({"name": ["x"], "value": ["not a number"]}), f)
    with pytest.raises(InputError, match=r"bad\.parquet: column 'value' has type string"):
        tables.read_table(f, "metrics")


def test_corrupt_parquet_is_a_one_line_error(tmp_path):
    f = tmp_path / "part-00000-of-00001.parquet"
    f.write_bytes(b"PAR1 garbage")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        tables.read_table(f, "metrics")


def test_reader_takes_file_dir_and_glob(tmp_path):
    for i in range(2):
        shards.write_part(tables.with_metadata(_metrics_table(2), "metrics"), tmp_path, shards.Shard(i, 2))
    assert tables.read_table(tmp_path, "metrics").num_rows == 4
    assert tables.read_table(tmp_path / "part-00001-of-00002.parquet", "metrics").num_rows == 2
    assert tables.read_table(str(tmp_path / "part-*.parquet"), "metrics").num_rows == 4
    with pytest.raises(InputError, match="no such file"):
        tables.read_table(tmp_path / "nope*.parquet", "metrics")


def test_media_paths_become_absolute_relative_to_the_part(tmp_path):
    t = pa.table({"name": ["a"], "value": [1.0], "mesh_path": ["meshes/a.glb"]})
    shards.write_part(t, tmp_path, shards.Shard(0, 1))
    back = tables.read_table(tmp_path, "metrics")
    assert back.column("mesh_path")[0].as_py() == str((tmp_path / "meshes/a.glb").resolve())


def _run_shard(out, index, count, fail=False):
    opts = StageOptions(out=out, shard=shards.Shard(index, count))

    def produce(shard, progress):
        if fail:
            raise RuntimeError("boom")
        return _metrics_table(index + 1), {"extra": 1}

    return run_stage("test", "metrics", opts, {"k": 1}, produce)


def test_incomplete_directory_is_refused_until_all_shards_finish(tmp_path):
    _run_shard(tmp_path, 0, 2)
    with pytest.raises(InputError, match=r"incomplete stage output: shards 1 of 2"):
        tables.read_table(tmp_path, "metrics")
    _run_shard(tmp_path, 1, 2)
    assert tables.read_table(tmp_path, "metrics").num_rows == 3
    manifest = json.loads((tmp_path / "_manifest.json").read_text())
    assert manifest["complete"] and manifest["completed_shards"] == [0, 1]


def test_completed_shard_is_skipped_and_overwrite_redoes(tmp_path):
    first = _run_shard(tmp_path, 0, 1)
    assert first["skipped"] is False and first["rows"] == 1
    assert _run_shard(tmp_path, 0, 1)["skipped"] is True
    opts = StageOptions(out=tmp_path, overwrite=True)
    s = run_stage("test", "metrics", opts, {"k": 1}, lambda sh, p: (_metrics_table(5), {}))
    assert s["skipped"] is False and tables.read_table(tmp_path, "metrics").num_rows == 5


def test_different_config_is_refused(tmp_path):
    _run_shard(tmp_path, 0, 1)
    opts = StageOptions(out=tmp_path)
    with pytest.raises(InputError, match="different config"):
        run_stage("test", "metrics", opts, {"k": 2}, lambda sh, p: (_metrics_table(), {}))


def test_failed_stage_leaves_previous_part_intact(tmp_path):
    _run_shard(tmp_path, 0, 1)
    before = (tmp_path / "part-00000-of-00001.parquet").read_bytes()
    opts = StageOptions(out=tmp_path, overwrite=True)
    with pytest.raises(RuntimeError):
        run_stage("test", "metrics", opts, {"k": 1}, lambda sh, p: (_ for _ in ()).throw(RuntimeError("x")))
    assert (tmp_path / "part-00000-of-00001.parquet").read_bytes() == before


def _slow_writer(out):
    # write a big part slowly enough to be killed in the middle
    big = pa.table({"name": ["x" * 1000] * 200_000, "value": [1.0] * 200_000})
    shards.write_part(big, out, shards.Shard(0, 1))


def test_killed_writer_leaves_no_torn_part(tmp_path):
    p = mp.get_context("fork").Process(target=_slow_writer, args=(tmp_path,))
    p.start()
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    parts = list(tmp_path.glob("part-*.parquet"))
    # either nothing or a whole, readable part; temp leftovers are never read as parts
    for f in parts:
        assert pq.read_table(f).num_rows == 200_000


def test_starting_shard_removes_only_its_own_leftovers(tmp_path):
    # Slurm array tasks start at different times: a late shard must not delete the temp file a
    # running shard is still writing, only what a killed run of itself left behind
    (tmp_path / ".part-00001-of-00002.parquet.tmp-999").write_bytes(b"being written")
    (tmp_path / ".part-00000-of-00002.parquet.tmp-998").write_bytes(b"torn")
    run_stage("test", "metrics", StageOptions(out=tmp_path, shard=shards.Shard(0, 2)), {"k": 1},
              lambda sh, p: (_metrics_table(), {}))
    assert (tmp_path / ".part-00001-of-00002.parquet.tmp-999").exists()
    assert not (tmp_path / ".part-00000-of-00002.parquet.tmp-998").exists()


def test_shard_assignment_is_stable_and_partitions_keys():
    keys = [f"p{i}" for i in range(200)]
    owners = [[k for k in keys if shards.Shard(i, 4).owns(k)] for i in range(4)]
    assert sorted(sum(owners, [])) == sorted(keys)
    assert all(len(o) > 20 for o in owners)
    assert shards.parse_shard(None, {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}) == shards.Shard(3, 8)
    assert shards.parse_shard("2/5", {}) == shards.Shard(2, 5)
    with pytest.raises(InputError):
        shards.parse_shard("5/5", {})
    with pytest.raises(InputError, match="pass --shard"):
        shards.parse_shard(None, {"SLURM_ARRAY_TASK_ID": "1"})


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv", ".parquet"])
def test_prompt_files(tmp_path, suffix):
    rows = [{"prompt": "a red chair", "category": "mechanical_affordance"}, {"prompt": "a tall tower", "prompt_id": "t1"}]
    f = tmp_path / f"p{suffix}"
    if suffix == ".txt":
        f.write_text("# comment\na red chair\n\na tall tower\n")
    elif suffix == ".jsonl":
        f.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".csv":
        f.write_text("prompt,prompt_id,category\na red chair,,mechanical_affordance\na tall tower,t1,\n")
    else:
        pq.write_table(pa.table({"prompt": ["a red chair", "a tall tower"], "prompt_id": [None, "t1"],
                                 "category": ["mechanical_affordance", None]}), f)
    t = read_prompts(f)
    assert t.column("prompt").to_pylist() == ["a red chair", "a tall tower"]
    ids = t.column("prompt_id").to_pylist()
    assert ids[0] == prompt_hash("a red chair")
    assert ids[1] == ("t1" if suffix != ".txt" else prompt_hash("a tall tower"))


def test_bad_prompt_rows_name_file_and_row(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "ok"}\n{"prompt": ""}\n')
    with pytest.raises(InputError, match=r"p\.jsonl: row 2: missing or empty 'prompt'"):
        read_prompts(f)
    f.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(InputError, match=r"p\.jsonl:2: invalid JSON"):
        read_prompts(f)
    with pytest.raises(InputError, match="prompt file not found"):
        read_prompts(tmp_path / "missing.txt")


def test_json_array_prompts_as_the_authors_release_them(tmp_path):
    """The Hi-GRPO authors' training prompts: a .json array of {prompt, task_type, category}; read
    like .jsonl (extra keys kept as strings); {"prompts": [...]} too; bad JSON names file and row."""
    records = [{"prompt": "a red chair", "task_type": "text-to-3d", "category": "furniture"},
               {"prompt": "a tall tower", "task_type": "text-to-3d", "category": "buildings", "prompt_id": "t1"}]
    f = tmp_path / "train.json"
    f.write_text(json.dumps(records, indent=2))
    t = read_prompts(f)
    assert t.column("prompt").to_pylist() == ["a red chair", "a tall tower"]
    assert t.column("prompt_id").to_pylist() == [prompt_hash("a red chair"), "t1"]
    assert t.column("category").to_pylist() == ["furniture", "buildings"]
    assert t.column("task_type").to_pylist() == ["text-to-3d", "text-to-3d"]
    jl = tmp_path / "train.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_prompts(jl).equals(t)  # the same table as the .jsonl of the same records
    (tmp_path / "wrapped.json").write_text(json.dumps({"prompts": records}))
    assert read_prompts(tmp_path / "wrapped.json").equals(t)
    for text, message in [('[{"prompt": "ok"},\n {"prompt": ', r"bad\.json:2: invalid JSON"),
                          ('{"prompt": "one object"}', r"bad\.json: expected a JSON array of objects"),
                          ('[{"prompt": "ok"}, "just text"]', r"bad\.json: row 2: expected a JSON object"),
                          ('[{"prompt": "ok"}, {"prompt": ""}]', r"bad\.json: row 2: missing or empty 'prompt'")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(InputError, match=message):
            read_prompts(tmp_path / "bad.json")


def _save_to_disk_layout(d, rows: list[dict]) -> None:
    """The folder `datasets.Dataset.save_to_disk` writes: Arrow IPC stream files listed in state.json."""
    d.mkdir(parents=True)
    half = len(rows) // 2
    files = []
    for i, part in enumerate([rows[:half], rows[half:]]):
        name = f"data-{i:05d}-of-00002.arrow"
        table = pa.Table.from_pylist(part)
        with pa.OSFile(str(d / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        files.append({"filename": name})
    (d / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (d / "state.json").write_text(json.dumps({"_data_files": files, "_fingerprint": "x", "_split": "train"}))


def test_hugging_face_dataset_folder_reads_like_jsonl(tmp_path):
    records = [{"prompt": f"object {i}", "task_type": "text-to-3d", "category": "c"} for i in range(5)]
    _save_to_disk_layout(tmp_path / "ds" / "train", records)
    t = read_prompts(tmp_path / "ds" / "train")
    jl = tmp_path / "p.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert t.equals(read_prompts(jl))
    # a DatasetDict folder: name the split
    (tmp_path / "ds" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(InputError, match=r"ds: a dataset with splits \(train\): give the folder of one split"):
        read_prompts(tmp_path / "ds")
    # a data file listed outside the folder is refused, a torn one named
    state = tmp_path / "ds" / "train" / "state.json"
    state.write_text(json.dumps({"_data_files": [{"filename": "../p.jsonl"}]}))
    with pytest.raises(InputError, match=r"state\.json: data file '\.\./p\.jsonl' is not a file in"):
        read_prompts(tmp_path / "ds" / "train")
    state.write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00002.arrow"}]}))
    (tmp_path / "ds" / "train" / "data-00000-of-00002.arrow").write_bytes(b"not arrow")
    with pytest.raises(InputError, match=r"data-00000-of-00002\.arrow: not a readable Arrow stream"):
        read_prompts(tmp_path / "ds" / "train")


def test_cli_contract_errors_exit_2_with_one_line(tmp_path):
    @click.command()
    @stage_options
    @handle_errors
    def cmd(**kw):
        opts = pop_stage_options(kw)
        report({"stage": "x", "rows": 0}, opts)
        raise InputError(f"{tmp_path}/in.parquet: row 7: bad value")

    res = CliRunner().invoke(cmd, ["--out", str(tmp_path / "o"), "--shard", "0/2"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].endswith("in.parquet: row 7: bad value")
    res = CliRunner().invoke(cmd, ["--out", str(tmp_path / "o"), "--shard", "3/2"])
    assert res.exit_code == 2 and "need 0 <= I < N" in res.output
