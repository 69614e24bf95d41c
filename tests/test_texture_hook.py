"""The texturing hook: a command template or module:function that paints a coarse GLB; its
failures are per-row texture statuses, never exceptions."""
import sys
import textwrap

import numpy as np
import pytest
import trimesh

from rl3d.formats.errors import InputError
from rl3d.formats.glb import face_rgb, read_glb, write_glb
from rl3d.stages.texturing import parse_hook, texture_meshes

PAINT = textwrap.dedent("""
    import sys, numpy as np, trimesh
    from pathlib import Path
    from rl3d.formats.glb import read_glb, write_glb

    def texture(glb, occupancy, prompt, reasoning, out, sample_id):
        mesh = read_glb(glb)
        red = "red" in prompt
        mesh.visual = trimesh.visual.ColorVisuals(mesh, face_colors=np.tile(
            [200, 30, 30, 255] if red else [30, 30, 200, 255], (len(mesh.faces), 1)))
        if occupancy:
            assert np.load(occupancy).any()
        write_glb(mesh, out)

    if __name__ == "__main__":
        a = dict(zip(["glb", "occupancy", "prompt", "reasoning", "out", "sample_id"], sys.argv[1:]))
        a["prompt"] = Path(a["prompt"]).read_text()
        a["reasoning"] = Path(a["reasoning"]).read_text()
        texture(**a)
""")


@pytest.fixture
def samples(tmp_path):
    out = tmp_path / "gen"
    (out / "meshes").mkdir(parents=True)
    rows = []
    for i, prompt in enumerate(["a red chair", "a blue table"]):
        write_glb(trimesh.creation.box(), out / "meshes" / f"p{i}-0-fine.glb")
        rows.append({"sample_id": f"p{i}-0-fine", "prompt": prompt, "reasoning": "four legs",
                     "mesh_path": f"meshes/p{i}-0-fine.glb", "status": "ok"})
    rows.append({"sample_id": "p2-0-fine", "prompt": "x", "mesh_path": None, "status": "decode_error"})
    script = tmp_path / "paint.py"
    script.write_text(PAINT)
    return out, rows, script


def test_command_hook_writes_textured_glbs(samples):
    out, rows, script = samples
    hook = f"{sys.executable} {script} {{glb}} {{occupancy}} {{prompt_file}} {{reasoning_file}} {{out}} {{sample_id}}"
    grids = {"p0-0-fine": np.ones((4, 4, 4), bool), "p1-0-fine": np.ones((4, 4, 4), bool)}
    res = texture_meshes(rows, hook, out, timeout=60, grids=grids)
    assert [r["texture_status"] for r in res] == ["ok", "ok", "no_mesh"]
    assert res[0]["textured_path"] == "_textured/p0-0-fine.glb" and res[2]["textured_path"] is None
    assert tuple(face_rgb(read_glb(out / res[0]["textured_path"]))[0]) == (200, 30, 30)
    assert tuple(face_rgb(read_glb(out / res[1]["textured_path"]))[0]) == (30, 30, 200)
    assert [r["status"] for r in res] == ["ok", "ok", "decode_error"]   # the sample's own status is kept
    assert "texture_status" not in rows[0]                              # inputs are not modified


def test_entry_point_hook(samples, monkeypatch):
    out, rows, script = samples
    monkeypatch.setenv("PYTHONPATH", str(script.parent))
    res = texture_meshes(rows[:1], "paint:texture", out, timeout=60)
    assert res[0]["texture_status"] == "ok", res[0]["texture_message"]
    assert tuple(face_rgb(read_glb(out / res[0]["textured_path"]))[0]) == (200, 30, 30)


def test_failures_are_row_statuses(samples, tmp_path):
    out, rows, _ = samples
    py = sys.executable
    fail = tmp_path / "fail.py"
    fail.write_text("import sys; sys.stderr.write('CUDA out of memory'); sys.exit(3)")
    res = texture_meshes(rows[:1], f"{py} {fail} {{out}}", out, timeout=30)
    assert res[0]["texture_status"] == "hook_failed" and "code 3" in res[0]["texture_message"]
    assert "CUDA out of memory" in res[0]["texture_message"] and res[0]["textured_path"] is None

    slow = tmp_path / "slow.py"
    slow.write_text("import time; time.sleep(30)")
    res = texture_meshes(rows[:1], f"{py} {slow} {{out}}", out, timeout=0.5)
    assert res[0]["texture_status"] == "hook_timeout" and "0.5 s" in res[0]["texture_message"]

    lazy = tmp_path / "lazy.py"
    lazy.write_text("pass")
    res = texture_meshes(rows[:1], f"{py} {lazy} {{out}}", out, timeout=30)
    assert res[0]["texture_status"] == "bad_output" and "wrote no GLB" in res[0]["texture_message"]

    junk = tmp_path / "junk.py"
    junk.write_text("import sys; open(sys.argv[1], 'wb').write(b'not a glb')")
    res = texture_meshes(rows[:1], f"{py} {junk} {{out}}", out, timeout=30)
    assert res[0]["texture_status"] == "bad_output" and "cannot read GLB" in res[0]["texture_message"]
    assert not (out / "_textured" / "p0-0-fine.glb").exists()

    res = texture_meshes(rows[:1], "/no/such/painter {out}", out, timeout=30)
    assert res[0]["texture_status"] == "hook_failed" and "could not start" in res[0]["texture_message"]

    res = texture_meshes(rows[:1], "no_such_module_xyz:paint", out, timeout=30)
    assert res[0]["texture_status"] == "hook_failed" and "ModuleNotFoundError" in res[0]["texture_message"]


def test_no_hook_leaves_meshes_untextured(samples):
    out, rows, _ = samples
    assert texture_meshes(rows, None, out) == rows
    assert not (out / "_textured").exists()


@pytest.mark.parametrize("spec, words", [("", "empty"), ("paint {glb}", "must name {out}"),
                                         ("paint {mesh} {out}", "unknown placeholder"),
                                         ("paint 'unclosed {out}", "cannot split")])
def test_bad_hook_specs_are_input_errors(spec, words):
    with pytest.raises(InputError, match=words):
        parse_hook(spec)


def test_placeholders_are_single_arguments():
    hook = parse_hook("paint --prompt {prompt_file} --out {out}")
    assert hook.kind == "command" and hook.argv == ("paint", "--prompt", "{prompt_file}", "--out", "{out}")
    assert parse_hook("pkg.mod:fn").kind == "entry_point"


def test_gen_runs_the_hook_and_records_texture_statuses(tmp_path):
    """rl3d gen --texture-hook: textured GLBs beside the meshes, a status per row, a bad spec exits 2."""

    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from helpers import make_tiny_policy

    from rl3d.cli.main import main

    policy = make_tiny_policy(tmp_path / "policy")
    (tmp_path / "prompts.txt").write_text("a red box\n")
    script = tmp_path / "paint.py"
    script.write_text(PAINT)
    hook = f"{sys.executable} {script} {{glb}} {{occupancy}} {{prompt_file}} {{reasoning_file}} {{out}} {{sample_id}}"
    args = ["gen", "--prompts", str(tmp_path / "prompts.txt"), "--policy", str(policy), "-G", "2",
            "--mode", "flat", "--max-reasoning-tokens", "4", "--quiet"]
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "gen"), "--texture-hook", hook])
    assert res.exit_code == 0, res.output
    rows = pq.read_table(tmp_path / "gen").to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["texture_status"] == "ok" for r in ok)
    assert all(tuple(face_rgb(read_glb(tmp_path / "gen" / r["textured_path"]))[0]) == (200, 30, 30) for r in ok)
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "bad"), "--texture-hook", "paint {glb}"])
    assert res.exit_code == 2 and "{out}" in res.output and not (tmp_path / "bad").exists()
