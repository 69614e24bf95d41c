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


def test_a_step_that_reports_nothing_repeats_its_last_line(capsys, monkeypatch):
    """After a log line, while nothing else is said, the line comes again with the time since (a model
    pass or the optimizer steps report nothing of their own); not during a tracked loop, not with
    --quiet, and no more once the Progress is gone."""
    import gc
    import time

    monkeypatch.setattr(contract, "PLAIN_EVERY_S", 0.5)
    p = Progress(quiet=False)
    p.tty = False
    p.log("rl-step: reference log-probs of 48 samples")
    time.sleep(2.6)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "[rl3d] rl-step: reference log-probs of 48 samples"
    assert len(lines) >= 2 and all(ln.startswith("[rl3d] rl-step: reference log-probs of 48 samples (still working, ")
                                   for ln in lines[1:])
    for _ in p.track(range(2), 2, "render"):
        time.sleep(1.6)
    assert "still working" not in capsys.readouterr().err
    quiet = Progress(quiet=True)
    quiet.log("nothing")
    del p, quiet
    gc.collect()
    time.sleep(2.2)
    assert capsys.readouterr().err == ""
