"""No code runs from data: checkpoints, trainer states and reward weights load as plain tensors,
model directories never import their own Python, and ids never become paths outside --out."""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rl3d.cli.main import main as cli
from rl3d.formats import shards as shards_io
from rl3d.formats.errors import InputError
from rl3d.formats.model_dirs import TRUST_REMOTE_CODE_ENV, remote_code_allowed
from rl3d.formats.prompts import read_prompts
from rl3d.stages.policy.checkpoint import load_policy
from rl3d.stages.rewards.hps import _read_weights
from rl3d.stages.policy.checkpoint import load_trainer_state, restore_rng, rng_state

from helpers import make_tiny_policy

PACKAGE = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this writes a marker file: the proof that a loader ran code from data."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "ran"))


def planted(path: Path, marker: Path, wrap=lambda p: p) -> Path:
    with open(path, "wb") as f:
        pickle.dump(wrap(Payload(marker)), f)
    return path


def test_trainer_state_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran.txt"
    state = planted(tmp_path / "trainer_state.pt", marker, lambda p: {"step": 1, "rng": p})
    with pytest.raises(InputError, match="trainer_state.pt: not a loadable rl3d trainer state"):
        load_trainer_state(state)
    assert not marker.exists()


def test_trainer_state_round_trips_every_rng(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save({"step": 7, "rng": rng_state()}, tmp_path / "trainer_state.pt")
    expect = (torch.rand(2), np.random.rand(2), random.random())
    state = load_trainer_state(tmp_path / "trainer_state.pt")  # weights_only=True inside
    restore_rng(state["rng"])
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert state["step"] == 7 and torch.equal(expect[0], got[0])
    assert np.array_equal(expect[1], got[1]) and expect[2] == got[2]


def test_hps_weights_with_code_are_refused(tmp_path):
    marker = tmp_path / "ran.txt"
    ckpt = planted(tmp_path / "HPS_v2.1_compressed.pt", marker, lambda p: {"state_dict": p})
    with pytest.raises(InputError, match="not loadable as plain weights"):
        _read_weights(str(ckpt))
    assert not marker.exists()
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ok.pt")
    assert torch.equal(_read_weights(str(tmp_path / "ok.pt"))["w"], torch.ones(2))


def test_policy_with_remote_code_does_not_run_it(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_REMOTE_CODE_ENV, raising=False)
    d = make_tiny_policy(tmp_path / "policy")
    marker = tmp_path / "ran.txt"
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="planted", auto_map={"AutoConfig": "planted.Config", "AutoModelForCausalLM": "planted.Model"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "planted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    meta = json.loads((d / "rl3d_policy.json").read_text())
    meta["model_class"] = "AutoModelForCausalLM"
    (d / "rl3d_policy.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="cannot load the model"):
        load_policy(d, device="cpu")
    # nothing is asked on stdin either: a "y" typed into the command changes nothing
    (tmp_path / "p.txt").write_text("a red box\n")
    res = CliRunner().invoke(cli, ["gen", "--prompts", str(tmp_path / "p.txt"), "--policy", str(d),
                                   "--out", str(tmp_path / "gen")], input="y\ny\n")
    assert res.exit_code == 2 and "cannot load the model" in res.output
    assert not marker.exists()


def test_trust_remote_code_is_a_flag(monkeypatch):
    monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, "0")  # restored after the test: the CLI sets it to 1
    assert not remote_code_allowed()
    res = CliRunner().invoke(cli, ["--trust-remote-code", "synth", "--help"])
    assert res.exit_code == 0 and remote_code_allowed()


@pytest.mark.parametrize("pid", ["../../x", "a/b", "..", ".hidden", "a\\b", "a\0b", "tab\there"])
def test_ids_that_would_leave_out_are_refused(tmp_path, pid):
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"prompt_id": pid, "prompt": "a red box"}) + "\n")
    with pytest.raises(InputError, match=re.escape(f"{f}: row 1: ")):
        read_prompts(f)


def test_gen_exits_2_on_a_path_id_and_writes_nothing_outside(tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"prompt_id": "../../escape", "prompt": "a red box"}) + "\n")
    res = CliRunner().invoke(cli, ["gen", "--prompts", str(f), "--out", str(tmp_path / "run" / "gen")])
    assert res.exit_code == 2 and "row 1: prompt_id '../../escape'" in res.output
    assert not list(tmp_path.parent.glob("escape*")) and not (tmp_path / "escape.glb").exists()


def test_inside_refuses_escapes(tmp_path):
    assert shards_io.inside(tmp_path, "meshes/a.glb") == tmp_path / "meshes/a.glb"
    with pytest.raises(InputError, match="refusing to write outside"):
        shards_io.inside(tmp_path, "meshes/../../x.glb")


def test_no_loader_in_the_package_can_run_code():
    """Every torch.load is weights_only=True and every from_pretrained pins trust_remote_code."""
    offenders = []
    for f in sorted(PACKAGE.glob("*/**/*.py")):
        if f.parts[len(PACKAGE.parts)] not in ("cli", "stages", "formats"):
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{f}:{n}: {line.strip()}")
            if ".from_pretrained(" in line and "trust_remote_code" not in line and "def " not in line:
                offenders.append(f"{f}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_child_takes_only_plain_file_names(tmp_path):
    """shards.child: a file of a folder checked once with inside(); a name that is not a plain file
    name is refused, whatever the folder."""
    from rl3d.formats.errors import InputError
    from rl3d.formats.shards import child

    assert child(tmp_path, "view-00.png") == tmp_path / "view-00.png"
    assert child(tmp_path, "a..b.glb") == tmp_path / "a..b.glb"
    for name in ("", ".", "..", "../x.png", "a/b.png", "a\\b.png", "x\0.png", "/etc/passwd"):
        with pytest.raises(InputError, match="refusing to write outside"):
            child(tmp_path, name)
