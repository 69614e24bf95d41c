"""Integrity of outputs outside the bad-input path (docs/robustness.md, "Guarantees"): an --overwrite
that dies leaves no complete output over mixed media, one writer per output, media paths that
never collide, inputs never overwritten, no write outside --out through a symlink, a changed
rl-step config refused, and a stage whose every row failed stopping a chain."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from rl3d.cli.main import main as cli
from rl3d.formats import shards as shards_io
from rl3d.formats.errors import InputError
from rl3d.formats.locks import lock_path
from rl3d.stages.contract import StageOptions
from rl3d.stages.raycast import images
from rl3d.stages.render import RenderOptions, run_render
from rl3d.stages.rl.rl_config import RLConfig
from rl3d.stages.rl_step import DONE_FILE, run_rl_step

TAG = "00000-of-00001"


class Killed(BaseException):
    """Stands for a SIGKILL in the middle of a stage: nothing after it runs (not even `except Exception`)."""


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_error_line(res, code: int = 2) -> str:
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == code, res.output
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture(scope="module")
def objs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("objs") / "objs"
    assert _cli("synth", "--n", "2", "--seed", "1", "--out", d, "--quiet").exit_code == 0
    return d


def _render(samples, out, *extra):
    return _cli("render", "--samples", samples, "--views", "1", "--resolution", "32", "--no-sheet",
                "--workers", "1", "--out", out, "--quiet", *extra)


def _files(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---- 1. --overwrite is atomic for media -----------------------------------------------------------

def test_render_overwrite_killed_after_its_first_png_leaves_no_complete_output(objs, tmp_path, monkeypatch):
    out = tmp_path / "r"
    assert _render(objs, out).exit_code == 0
    real, written = images.save_png, []

    def dies_after_one(arr, path):
        if written:
            raise Killed()
        written.append(path)
        real(arr, path)

    monkeypatch.setattr(images, "save_png", dies_after_one)
    with pytest.raises(Killed):
        run_render(objs, StageOptions(out=out, overwrite=True, quiet=True), views=1, resolution=48, sheet=False,
                   workers=1)
    assert len(written) == 1 and Image.open(written[0]).size == (48, 48)  # one new image over the old output
    with pytest.raises(InputError, match="incomplete stage output"):
        shards_io.check_complete(out)  # the old table no longer claims the images
    monkeypatch.undo()
    # the rerun of the killed command, without --overwrite, finishes the new output
    res = run_render(objs, StageOptions(out=out, quiet=True), views=1, resolution=48, sheet=False, workers=1)
    assert res["skipped"] is False
    shards_io.check_complete(out)
    for p in pq.read_table(out).column("image_path").to_pylist():
        assert Image.open(out / p).size == (48, 48)


def test_synth_overwrite_killed_after_its_first_glb_leaves_no_complete_output(tmp_path, monkeypatch):
    from rl3d.stages import synth

    out = tmp_path / "s"
    assert _cli("synth", "--n", "2", "--seed", "1", "--out", out, "--quiet").exit_code == 0
    real, written = synth.write_glb, []

    def dies_after_one(mesh, path):
        if written:
            raise Killed()
        written.append(path)
        return real(mesh, path)

    monkeypatch.setattr(synth, "write_glb", dies_after_one)
    with pytest.raises(Killed):
        synth.run_synth(2, 2, "all", StageOptions(out=out, overwrite=True, quiet=True))
    with pytest.raises(InputError, match="incomplete stage output"):
        shards_io.check_complete(out)  # no seed-1 table over a seed-2 mesh


# ---- 2. one writer per output ---------------------------------------------------------------------

def test_a_second_writer_of_one_output_is_refused_naming_the_holder(objs, tmp_path):
    out = tmp_path / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom rl3d.formats.locks import writer_lock\n"
         f"with writer_lock(sys.argv[1], {TAG!r}):\n    print('held', flush=True)\n    time.sleep(120)\n", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = _one_error_line(_render(objs, out))
        assert "another rl3d run is writing" in line and f"pid {holder.pid}" in line
        assert f"host {socket.gethostname()}" in line
        assert not list(out.glob("part-*")) and not (out / shards_io.MANIFEST).exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder's lock file stays behind: a stale lock, taken over by the next run
    assert lock_path(out, TAG).exists()
    assert _render(objs, out).exit_code == 0
    shards_io.check_complete(out)
    assert not lock_path(out, TAG).exists()  # released


def test_a_stale_lock_of_a_dead_process_is_taken_over(objs, tmp_path):
    out = tmp_path / "r"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path(out, TAG).parent.mkdir(parents=True)
    lock_path(out, TAG).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 0}))
    assert _render(objs, out).exit_code == 0
    shards_io.check_complete(out)


def test_shards_of_one_output_lock_separately(tmp_path):
    from rl3d.formats.locks import writer_lock

    with writer_lock(tmp_path, "00000-of-00002"), writer_lock(tmp_path, "00001-of-00002"):
        with pytest.raises(InputError, match="another rl3d run is writing"):
            with writer_lock(tmp_path, "00001-of-00002"):
                pass


# ---- 3. injective media paths ---------------------------------------------------------------------

def test_sample_ids_that_sanitise_alike_are_refused(objs, tmp_path):
    glb = sorted((objs / shards_io.MESHES).glob("*.glb"))[0]
    table = tmp_path / "samples.parquet"
    pq.write_table(pa.table({"sample_id": ["chair:0", "table-1", "chair_0"], "mesh_path": [str(glb)] * 3}), table)
    line = _one_error_line(_render(table, tmp_path / "r"))
    assert "samples.parquet: row 2" in line and "'chair_0'" in line and "'chair:0'" in line and "row 0" in line
    assert not (tmp_path / "r" / shards_io.IMAGES).exists()


def test_glb_names_that_sanitise_alike_are_refused(objs, tmp_path):
    glb = sorted((objs / shards_io.MESHES).glob("*.glb"))[0]
    d = tmp_path / "glbs"
    d.mkdir()
    shutil.copy(glb, d / "good one.glb")
    shutil.copy(glb, d / "good_one.glb")
    line = _one_error_line(_render(d, tmp_path / "r"))
    assert "good one.glb" in line and "good_one.glb" in line


# ---- 4. --out never is, contains or is inside an input --------------------------------------------

@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_render_out_over_its_input_is_refused(objs, tmp_path, where):
    samples = tmp_path / "objs"
    shutil.copytree(objs, samples)
    before = _files(samples)
    out = {"is": samples, "inside": samples / "renders", "contains": tmp_path}[where]
    line = _one_error_line(_render(samples, out, "--overwrite"))
    assert f"{'is inside' if where == 'inside' else where} the input --samples" in line
    assert _files(samples) == before


def test_reward_out_equal_to_its_samples_is_refused(objs, tmp_path):
    samples = tmp_path / "objs"
    shutil.copytree(objs, samples)
    before = _files(samples)
    res = _cli("reward", "--samples", samples, "--config", "default", "--out", samples, "--overwrite", "--quiet")
    assert "is the input --samples" in _one_error_line(res)
    assert _files(samples) == before


def test_rl_step_out_equal_to_its_policy_is_refused(objs, tmp_path):
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "config.json").write_text("{}")
    res = _cli("rl-step", "--policy", policy, "--samples", objs, "--rewards", objs, "--out", policy, "--overwrite")
    assert "is the input --policy" in _one_error_line(res)
    assert (policy / "config.json").read_text() == "{}"


# ---- 5. no media or marker write outside --out, symlinks included ---------------------------------

@pytest.mark.parametrize("folder", [shards_io.IMAGES, shards_io.MARKERS])
def test_render_refuses_a_folder_of_out_that_leads_outside(objs, tmp_path, folder):
    out, elsewhere = tmp_path / "r", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / folder).symlink_to(elsewhere, target_is_directory=True)
    line = _one_error_line(_render(objs, out))
    assert "refusing to write outside" in line and folder in line
    assert list(elsewhere.iterdir()) == []


def test_every_image_write_checks_its_path(objs, tmp_path):
    """A per-sample folder turned into a link after the start is caught at the write itself."""
    from rl3d.stages.render import write_job

    out, elsewhere = tmp_path / "r", tmp_path / "elsewhere"
    (out / shards_io.IMAGES).mkdir(parents=True)
    elsewhere.mkdir()
    (out / shards_io.IMAGES / "x").symlink_to(elsewhere, target_is_directory=True)
    import numpy as np

    rows = [{"azimuth": 0.0, "elevation": 0.0, "image_path": ""}]
    with pytest.raises(InputError, match="refusing to write outside"):
        write_job({"sample_id": "x"}, rows, {"rgb": np.zeros((1, 8, 8, 3), np.uint8)}, str(out),
                  RenderOptions(views=1, sheet=False))
    assert list(elsewhere.iterdir()) == []


# ---- 13. rl-step refuses a changed config over a complete checkpoint ------------------------------

def test_rl_step_refuses_a_complete_checkpoint_of_another_config(objs, tmp_path):
    out = tmp_path / "step"
    out.mkdir()
    (out / DONE_FILE).write_text(json.dumps({"config": {"rl": asdict(RLConfig(lr=2e-5))}, "metrics": {}}))
    with pytest.raises(InputError, match=r"rl_step.json: made with another config \(lr 2e-05 -> 0.0001\)"):
        run_rl_step(tmp_path / "p", objs, objs, out, RLConfig(lr=1e-4))
    # settings that change only how the step is computed, and the same config, skip as before
    assert run_rl_step(tmp_path / "p", objs, objs, out, RLConfig(lr=2e-5, micro_batch=2))["skipped"] is True


# ---- 14. a stage whose every row failed stops a chain ---------------------------------------------

def test_a_stage_whose_every_row_failed_exits_3_unless_allowed(tmp_path):
    table = tmp_path / "samples.parquet"
    pq.write_table(pa.table({"sample_id": ["a", "b"], "mesh_path": [str(tmp_path / "no.glb")] * 2}), table)
    line = _one_error_line(_render(table, tmp_path / "r"), code=3)
    assert "all 2 rows failed (render_error 2)" in line and "row 0 a:" in line
    assert not (tmp_path / "r" / shards_io.MANIFEST).exists() or shards_io.missing_shards(tmp_path / "r") == [0]
    assert not list((tmp_path / "r").glob("part-*"))
    res = _cli("render", "--samples", table, "--views", "1", "--resolution", "32", "--out", tmp_path / "r2",
               "--allow-failures", "--json", "--quiet")
    assert res.exit_code == 0 and json.loads(res.output)["failed_rows"] == 2
    shards_io.check_complete(tmp_path / "r2")


def test_the_summary_counts_failed_rows(objs, tmp_path):
    res = _cli("render", "--samples", objs, "--views", "1", "--resolution", "32", "--out", tmp_path / "r", "--json", "--quiet")
    assert res.exit_code == 0 and json.loads(res.output)["failed_rows"] == 0


# ---- 11, 12. secrets ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["http://host/${RL3D_SECRET}", "${HOME}", "x${RL3D_SECRET}", "${RL3D_KEY}"])
def test_a_reward_config_never_expands_the_environment_into_a_request(monkeypatch, value):
    from rl3d.stages.rewards.reward_config import parse_config

    monkeypatch.setenv("RL3D_SECRET", "s3cret")
    monkeypatch.setenv("RL3D_KEY", "k3y")
    raw = {"levels": {"single": [{"name": "judge", "backend": "vlm", "aggregate": "mean",
                                  "options": {"rubric": "appearance", "endpoint": value, "model_name": "m",
                                              "api_key_env": "RL3D_KEY"}}]}}
    with pytest.raises(InputError, match=r"my.toml: levels.single\[0\].options.endpoint: ") as e:
        parse_config(raw, "my.toml")
    assert "s3cret" not in str(e.value) and "k3y" not in str(e.value)
    raw["levels"]["single"][0]["options"]["endpoint"] = "${RL3D_SECRET}"  # a whole RL3D_ value still expands
    assert parse_config(raw, "my.toml").terms("single")[0].options["endpoint"] == "s3cret"


def test_trust_remote_code_from_the_environment_alone_stays_off(monkeypatch):
    from rl3d.formats.model_dirs import TRUST_REMOTE_CODE_ENV, remote_code_allowed

    monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, "1")  # inherited from a shell profile
    res = CliRunner().invoke(cli, ["synth", "--help"])
    assert res.exit_code == 0 and not remote_code_allowed()
    assert f"{TRUST_REMOTE_CODE_ENV}=1 in the environment is ignored" in res.output
    res = CliRunner().invoke(cli, ["--trust-remote-code", "synth", "--help"])
    assert res.exit_code == 0 and remote_code_allowed() and "ignored" not in res.output


# ---- 7. numbers the update consumes are range-checked ---------------------------------------------

@pytest.mark.parametrize("field,value", [("beta", -1.0), ("lr", 10.0), ("clip_low", -0.2), ("std_eps", 0.0),
                                         ("temperature", 0.0), ("lam", 1e308)])
def test_rl_settings_out_of_range_are_refused(field, value):
    with pytest.raises(InputError, match=f"--{field.replace('_', '-')} "):
        RLConfig(**{field: value}).check()


@pytest.mark.parametrize("key,value", [("weight", 1e308), ("scale", "1e308"), ("weight", -1e7)])
def test_a_term_weight_beyond_the_range_is_refused(key, value):
    from rl3d.stages.rewards.reward_config import parse_config

    raw = {"levels": {"single": [{"name": "symmetry", "backend": "geometry", "aggregate": "none", key: value}]}}
    with pytest.raises(InputError, match=rf"my.toml: levels.single\[0\].{key}: .* is outside"):
        parse_config(raw, "my.toml")


@pytest.mark.parametrize("elevation", ["nan", "inf", "90", "-95"])
def test_render_refuses_an_elevation_that_cannot_be_seen_from(objs, tmp_path, elevation):
    line = _one_error_line(_render(objs, tmp_path / "r", "--elevation", elevation))
    assert f"--elevation {float(elevation)}" in line
    assert not (tmp_path / "r").exists()


def test_rl_step_refuses_a_reward_total_that_overflows(tmp_path, monkeypatch):
    from rl3d.stages.rl import inputs

    rewards = pa.table({"sample_id": ["a", "b"], "total": [1.0, 1e308], "status": ["ok", "ok"]})
    samples = pa.table({"sample_id": ["a", "b"]})
    monkeypatch.setattr(inputs, "model_limits", lambda d: type("L", (), {"vocab_size": None, "max_positions": None}))
    monkeypatch.setattr(inputs.tables, "read_table", lambda p, kind: rewards if kind == "rewards" else samples)
    monkeypatch.setattr(inputs, "suspect_rows", lambda *a: [])  # the samples pass; only the rewards are under test
    with pytest.raises(InputError, match=r"rewards.parquet: row 2 \(sample 'b'\): total 1e\+308 outside"):
        inputs.check_step_inputs(tmp_path, tmp_path / "samples.parquet", tmp_path / "rewards.parquet", RLConfig())


# ---- 10. the remaining tracebacks are one-line errors ---------------------------------------------

def test_render_refuses_a_float_sample_index(objs, tmp_path):
    glb = sorted((objs / shards_io.MESHES).glob("*.glb"))[0]
    table = tmp_path / "floats.parquet"
    pq.write_table(pa.table({"sample_id": ["a"], "mesh_path": [str(glb)], "sample_index": [0.0]}), table)
    line = _one_error_line(_render(table, tmp_path / "r"))
    assert "floats.parquet: column 'sample_index' is double, expected an integer" in line


def test_a_reward_config_nested_too_deeply_is_one_line(tmp_path):
    from rl3d.stages.rewards.reward_config import load_config

    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(InputError, match="deep.toml: nested too deeply"):
        load_config(deep)


def test_model_class_that_is_no_model_is_refused(tmp_path):
    from helpers import make_tiny_policy

    from rl3d.stages.policy.checkpoint import load_policy

    d = make_tiny_policy(tmp_path / "policy")
    meta = json.loads((d / "rl3d_policy.json").read_text())
    (d / "rl3d_policy.json").write_text(json.dumps({**meta, "model_class": "AutoTokenizer"}))
    with pytest.raises(InputError, match="model_class 'AutoTokenizer' is not a transformers model class"):
        load_policy(d, device="cpu")


def test_a_pickled_optimizer_state_is_one_line_and_runs_nothing(tmp_path):
    import pickle

    from rl3d.stages.policy.checkpoint import load_optimizer_state

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (tmp_path / "ran.txt", "ran"))

    (tmp_path / "optimizer.pt").write_bytes(pickle.dumps({"state": Payload()}))
    with pytest.raises(InputError) as e:
        load_optimizer_state(tmp_path / "optimizer.pt")
    assert "optimizer.pt: not a loadable optimizer state" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "ran.txt").exists()


# ---- 8. bounded reads -----------------------------------------------------------------------------

def test_a_prompt_file_that_is_a_device_is_refused_at_once(tmp_path):
    from rl3d.formats.prompts import read_prompts

    link = tmp_path / "prompts.txt"
    link.symlink_to("/dev/zero")
    with pytest.raises(InputError, match="prompts.txt: prompt file is a device, FIFO or socket, not a regular file"):
        read_prompts(link)


def test_prompt_files_and_lines_have_a_size_cap(tmp_path, monkeypatch):
    from rl3d.formats import reads
    from rl3d.formats.prompts import read_prompts

    f = tmp_path / "prompts.txt"
    f.write_text("a red box\n" + "x" * 3000 + "\n")
    monkeypatch.setattr(reads, "MAX_LINE_BYTES", 1024)
    with pytest.raises(InputError, match=r"prompts.txt:2: line longer than 1 KiB"):
        read_prompts(f)
    monkeypatch.setattr(reads, "MAX_TEXT_BYTES", 2**20)
    f.write_bytes(b"a red box\n" * (2**20 // 10 + 1))
    with pytest.raises(InputError, match=r"prompts.txt: prompt file larger than 1 MiB"):
        read_prompts(f)


def test_a_prompt_id_too_long_for_a_file_name_is_refused_when_read(tmp_path):
    from rl3d.formats.prompts import read_prompts

    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"prompt_id": "p" * 300, "prompt": "a red box"}) + "\n")
    with pytest.raises(InputError, match=r"prompts.jsonl: row 1: prompt_id 'p+'... is 300 bytes long, more than 176"):
        read_prompts(f)


def test_a_weight_file_linked_to_a_device_is_refused_not_read_for_ever(tmp_path):
    from rl3d.stages.policy.checkpoint import weights_hash

    (tmp_path / "model.safetensors").symlink_to("/dev/zero")
    with pytest.raises(InputError, match="model.safetensors: weight file is a device, FIFO or socket"):
        weights_hash(tmp_path)


# ---- 9. a full disk fails the shard, in one line --------------------------------------------------

def test_synth_on_a_full_disk_fails_the_shard_instead_of_keeping_error_rows(tmp_path, monkeypatch):
    import errno

    from rl3d.stages import synth

    def full(mesh, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(synth, "write_glb", full)
    out = tmp_path / "s"
    line = _one_error_line(_cli("synth", "--n", "2", "--seed", "1", "--out", out, "--quiet"))
    assert "_meshes/" in line and line.endswith("No space left on device")
    assert shards_io.missing_shards(out) == [0]  # no complete table of mesh_error rows
    monkeypatch.undo()  # space freed: the rerun repairs it
    assert _cli("synth", "--n", "2", "--seed", "1", "--out", out, "--quiet").exit_code == 0
    assert set(pq.read_table(out).column("status").to_pylist()) == {"ok"}


def test_a_full_disk_while_saving_weights_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import errno

    from safetensors import SafetensorError

    from helpers import make_tiny_policy

    from rl3d.stages.policy.checkpoint import load_policy, save_policy

    policy = load_policy(make_tiny_policy(tmp_path / "policy"), device="cpu")

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(policy.model, "save_pretrained", full)
    with pytest.raises(OSError) as e:
        save_policy(tmp_path / "out", policy.model, policy.tokenizer, policy.codec)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "out" / "model.safetensors")
    assert not list(tmp_path.glob(".out.tmp-*")) and not (tmp_path / "out").exists()


# ---- 15. pool workers exit with their stage -------------------------------------------------------

ORPHAN_SCRIPT = """
import os, sys, time
from rl3d.stages.contract import process_pool
if __name__ == "__main__":
    pool = process_pool(2)
    pids = {pool.submit(os.getpid).result() for _ in range(8)}
    print(" ".join(map(str, sorted(pids))), flush=True)
    time.sleep(600)  # idle workers wait on the call queue, as after a stage was SIGKILLed mid-run
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_pool_workers_exit_when_their_stage_is_killed(tmp_path):
    import time

    script = tmp_path / "stage.py"
    script.write_text(ORPHAN_SCRIPT)
    stage = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in stage.stdout.readline().split()]
    assert workers and all(_alive(p) for p in workers)
    stage.send_signal(signal.SIGKILL)
    stage.wait()
    deadline = time.time() + 20
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.2)
    left = [p for p in workers if _alive(p)]
    for p in left:  # do not leave them behind when the test fails
        os.kill(p, signal.SIGKILL)
    assert not left, f"workers {left} outlived their killed stage"


def test_pool_workers_outlive_the_signals_their_stage_handles():
    """SIGINT, SIGTERM and SIGUSR1 sent to a whole process group (timeout, scancel, Ctrl-C) leave
    the workers alive and the pool usable: the stage decides what happens."""
    from rl3d.stages.contract import process_pool

    with process_pool(2) as pool:
        pids = {pool.submit(os.getpid).result() for _ in range(8)}
        for pid in pids:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                os.kill(pid, sig)
        assert sum(pool.submit(abs, -i).result() for i in range(8)) == 28
        assert all(_alive(p) for p in pids)


def test_render_pool_is_a_process_pool(objs, tmp_path, monkeypatch):
    """render's pool (the one the issue saw outlive three kills) is a process_pool."""
    from rl3d.stages import contract, render

    made = []
    real = contract.process_pool
    monkeypatch.setattr(render, "process_pool", lambda *a, **k: made.append(a) or real(*a, **k))
    run_render(objs, StageOptions(out=tmp_path / "r", quiet=True), views=1, resolution=32, sheet=False,
               workers=2, backend="open3d")
    assert made == [(2,)]


# ---- 6. provenance: content, not paths; rows when the metadata is gone -----------------------------

@pytest.fixture(scope="module")
def gen_run(tmp_path_factory) -> dict:
    from helpers import make_tiny_policy

    d = tmp_path_factory.mktemp("gen")
    policy = make_tiny_policy(d / "policy")
    prompts = d / "prompts.txt"
    prompts.write_text("a red box\n")
    args = ["gen", "--prompts", prompts, "--policy", policy, "--mode", "flat", "-G", 2, "--max-reasoning-tokens", 2,
            "--out", d / "gen", "--quiet", "--allow-failures"]
    res = _cli(*args)
    assert res.exit_code == 0, res.output
    return {"dir": d, "prompts": prompts, "args": args, "gen": d / "gen", "policy": policy}


def test_gen_over_changed_prompts_at_one_path_is_another_run(gen_run):
    before = gen_run["prompts"].read_text()
    try:
        gen_run["prompts"].write_text("a blue chair\n")  # same path, other content: not "already complete"
        line = _one_error_line(_cli(*gen_run["args"]))
        assert "holds output of a different config" in line
    finally:
        gen_run["prompts"].write_text(before)
    res = _cli(*gen_run["args"], "--json")
    assert res.exit_code == 0 and json.loads(res.output.splitlines()[-1])["skipped"] is True


def test_a_table_id_hashes_its_inputs_ids_not_their_paths(tmp_path):
    from rl3d.formats import tables

    objs = tmp_path / "objs"
    ids = []
    for seed in (1, 2):  # other objects at the same path
        assert _cli("synth", "--n", "1", "--seed", seed, "--out", objs, "--overwrite", "--quiet").exit_code == 0
        assert _render(objs, tmp_path / f"r{seed}").exit_code == 0
        ids.append(tables.provenance(tmp_path / f"r{seed}").table_id)
    assert ids[0] != ids[1]


def _stripped(src: Path, dst: Path) -> Path:
    """The table as pandas or duckdb would write it back: rows kept, rl3d's schema metadata gone."""
    t = pq.read_table(src)
    pq.write_table(t.replace_schema_metadata(None), dst)
    return dst


def test_a_join_without_provenance_is_refused_unless_allowed(objs, tmp_path):
    assert _render(objs, tmp_path / "r").exit_code == 0
    # beside the part: the image paths stay relative to the table's folder
    stripped = _stripped(tmp_path / "r" / f"part-{TAG}.parquet", tmp_path / "r" / "renders.parquet")
    args = ["reward", "--samples", objs, "--renders", stripped, "--config", "flat", "--out", tmp_path / "rw", "--quiet"]
    line = _one_error_line(_cli(*args))
    assert "renders.parquet: carries no rl3d provenance" in line and "--allow-unverified" in line
    res = _cli(*args[:-1], "--allow-unverified")  # without --quiet: the warning says what was not checked
    assert res.exit_code == 0 and "WARNING: " in res.output and "was not written by rl3d" in res.output
    shards_io.check_complete(tmp_path / "rw")


def test_the_off_policy_check_reads_the_rows_when_the_metadata_is_gone(gen_run, tmp_path):
    from helpers import make_tiny_policy

    from rl3d.stages.contract import Progress
    from rl3d.stages.rl_step import check_batch

    samples = _stripped(gen_run["gen"] / f"part-{TAG}.parquet", tmp_path / "samples.parquet")
    other = make_tiny_policy(tmp_path / "other", seed=1)  # other weights
    with pytest.raises(InputError, match=r"samples.parquet: row 1: sampled by policy .*, not by --policy"):
        check_batch(samples, samples, other, False, Progress(quiet=True), allow_unverified=True)
    check_batch(samples, samples, gen_run["policy"], False, Progress(quiet=True), allow_unverified=True)
    check_batch(samples, samples, other, True, Progress(quiet=True), allow_unverified=True)  # --allow-off-policy
