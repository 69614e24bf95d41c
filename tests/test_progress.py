"""Progress users can trust: plain lines with an ETA in a pipe, and rl-step metrics in TensorBoard."""
from __future__ import annotations

from rl3d.stages import contract
from rl3d.stages.contract import Progress, plain_line
from rl3d.stages.scoring.run_metrics import write_tensorboard


def test_plain_line_has_share_elapsed_and_eta():
    assert plain_line("gen", 16, 64, 30.0) == "gen 16/64 (25%) 30s elapsed, ETA 1m30s"
    assert plain_line("gen", 64, 64, 3725.0) == "gen 64/64 (100%) 1h02m elapsed, ETA 0s"
    assert plain_line("render", 3, None, 5.0) == "render 3 (5s elapsed)"


def test_track_in_a_pipe_prints_periodic_lines(capsys, monkeypatch):
    monkeypatch.setattr(contract, "PLAIN_EVERY_S", 0.0)  # every item
    p = Progress(quiet=False)
    p.tty = False
    assert list(p.track(range(4), 4, "render")) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("[rl3d] render 4/4 (100%)") and "ETA" in lines[0]
    quiet = Progress(quiet=True)
    assert list(quiet.track(range(3), 3, "x")) == [0, 1, 2] and capsys.readouterr().err == ""


def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_tensorboard(tmp_path / "tb", 3, {"loss": 0.5, "kl": 0.01, "warnings": "", "skipped": True})
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "kl"}
    (event,) = acc.Scalars("loss")
    assert event.step == 3 and abs(event.value - 0.5) < 1e-7
