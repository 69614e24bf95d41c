"""Advantages and back-flow on hand-made reward tables."""
import numpy as np
import pytest

from rl3d.formats.errors import InputError
from rl3d.stages.rl.advantages import compute_advantages


def _traj(pid, rewards_coarse, rewards_fine):
    rows = []
    for i, (rc, rf) in enumerate(zip(rewards_coarse, rewards_fine)):
        rows.append(dict(sample_id=f"{pid}-{i}-coarse", prompt_id=pid, sample_index=i, level="coarse", total=rc, status="ok"))
        rows.append(dict(sample_id=f"{pid}-{i}-fine", prompt_id=pid, sample_index=i, level="fine", total=rf, status="ok"))
    return rows


def _by_id(out):
    return {a.sample_id: a for a in out}


def test_hi_grpo_back_flow_and_group_normalisation():
    out, stats = compute_advantages(_traj("p", [1.0, 0.0, 0.5], [0.0, 1.0, 2.0]), lam=1.0)
    a = _by_id(out)
    r_high = np.array([1.0, 1.0, 2.5])          # R_high + 1.0 * R_low
    exp_high = (r_high - r_high.mean()) / (r_high.std() + 1e-4)
    r_low = np.array([0.0, 1.0, 2.0])
    exp_low = (r_low - r_low.mean()) / (r_low.std() + 1e-4)
    assert [a[f"p-{i}-coarse"].reward for i in range(3)] == pytest.approx(list(r_high))
    assert [a[f"p-{i}-coarse"].advantage for i in range(3)] == pytest.approx(list(exp_high))
    assert [a[f"p-{i}-fine"].advantage for i in range(3)] == pytest.approx(list(exp_low))
    assert stats == {"groups": 1, "dropped_failed": 0, "dropped_no_spread": 0, "penalized_failed": 0}


def test_lambda_zero_has_no_back_flow():
    out, _ = compute_advantages(_traj("p", [1.0, 0.0], [5.0, 9.0]), lam=0.0)
    a = _by_id(out)
    assert a["p-0-coarse"].advantage > 0 > a["p-1-coarse"].advantage


def test_zero_spread_groups_kept_with_zero_advantage_or_dropped():
    rows = _traj("p", [0.3, 0.3], [1.0, 1.0]) + _traj("q", [0.0, 1.0], [0.0, 1.0])
    out, stats = compute_advantages(rows, lam=1.0)
    a = _by_id(out)
    assert a["p-0-fine"].advantage == 0.0 and a["p-0-fine"].kept
    out, stats = compute_advantages(rows, lam=1.0, dynamic_sampling="zero-std")
    a = _by_id(out)
    assert not a["p-0-fine"].kept and not a["p-0-coarse"].kept and a["q-0-fine"].kept
    assert stats["dropped_no_spread"] == 2  # both levels of p
    out, stats = compute_advantages(rows, lam=1.0, dynamic_sampling="min-std", min_std=0.6)
    assert stats["dropped_no_spread"] == 3  # p (both levels) and q's fine level (std 0.5)


def test_failed_reward_drops_the_whole_group_or_errors():
    rows = _traj("p", [1.0, None], [0.0, 1.0]) + _traj("q", [0.0, 1.0], [0.0, 1.0])
    out, stats = compute_advantages(rows)
    a = _by_id(out)
    assert not any(a[f"p-{i}-{lv}"].kept for i in range(2) for lv in ("coarse", "fine"))
    assert a["q-1-fine"].kept and stats["dropped_failed"] == 1
    with pytest.raises(InputError, match="p-1-coarse has no reward"):
        compute_advantages(rows, failed_rewards="error")


def test_penalty_scores_policy_failures_and_still_drops_backend_failures():
    rows = _traj("p", [1.0, None], [0.5, 1.0]) + _traj("q", [0.0, 1.0], [None, 1.0])
    for r in rows:
        if r["sample_id"] == "p-1-coarse":
            r["status"] = "decode_error"          # the policy's own fault: an empty mesh
        if r["sample_id"] == "q-0-fine":
            r["status"] = "backend_error:clip"     # not the policy's fault
    out, stats = compute_advantages(rows, failed_rewards="penalty", failed_penalty=-1.0)
    a = _by_id(out)
    r_high = np.array([1.0 + 0.5, -1.0 + 1.0])   # the failed coarse total is the penalty, then back-flow
    exp = (r_high - r_high.mean()) / (r_high.std() + 1e-4)
    assert [a[f"p-{i}-coarse"].advantage for i in range(2)] == pytest.approx(list(exp))
    assert a["p-1-coarse"].kept and "scored -1" in a["p-1-coarse"].reason and a["p-1-coarse"].reward == -1.0 + 1.0
    assert a["p-0-fine"].advantage < 0 < a["p-1-fine"].advantage  # the fine level is unaffected
    assert not any(a[f"q-{i}-{lv}"].kept for i in range(2) for lv in ("coarse", "fine"))
    assert stats["penalized_failed"] == 1 and stats["dropped_failed"] == 1


def test_single_sample_group_has_zero_advantage_and_flat_grpo():
    out, _ = compute_advantages(_traj("p", [1.0], [2.0]))
    assert all(x.advantage == 0.0 for x in out)
    rows = [dict(sample_id=f"s{i}", prompt_id="p", sample_index=i, level="single", total=float(i), status="ok")
            for i in range(4)]
    out, _ = compute_advantages(rows, algo="grpo", adv_std="none")
    assert [x.advantage for x in out] == pytest.approx([-1.5, -0.5, 0.5, 1.5])
    with pytest.raises(InputError, match="grpo expects level 'single'"):
        compute_advantages(_traj("p", [1.0], [2.0]), algo="grpo")


def test_hi_grpo_requires_paired_levels():
    rows = _traj("p", [1.0, 0.0], [0.0, 1.0])[:-1]
    with pytest.raises(InputError, match="one coarse and one fine row per sample_index"):
        compute_advantages(rows)


def test_train_levels_keeps_one_level_and_leaves_its_advantages_unchanged():
    rows = _traj("p", [1.0, 0.0, 0.5], [0.0, 1.0, 2.0])
    both = _by_id(compute_advantages(rows, lam=1.0)[0])
    for level, other in (("coarse", "fine"), ("fine", "coarse")):
        out, stats = compute_advantages(rows, lam=1.0, train_levels=level)
        a = _by_id(out)
        assert stats["untrained_level_rows"] == 3
        for i in range(3):
            mine, theirs = a[f"p-{i}-{level}"], a[f"p-{i}-{other}"]
            assert mine.kept and mine.advantage == pytest.approx(both[f"p-{i}-{level}"].advantage)
            assert not theirs.kept and theirs.reason == f"level not trained (--train-levels {level})"
    assert "untrained_level_rows" not in compute_advantages(rows)[1]  # the default's stats are unchanged


def test_train_levels_is_checked():
    from rl3d.stages.rl.rl_config import RLConfig

    with pytest.raises(InputError, match="--train-levels 'both': expected one of all, coarse, fine"):
        RLConfig(train_levels="both").check()
    with pytest.raises(InputError, match="only --algo hi-grpo has levels"):
        RLConfig(algo="grpo", train_levels="fine").check()
    assert RLConfig(train_levels="fine").check().train_levels == "fine"


@pytest.mark.parametrize("name, typo", [("algo", "hi_grpo"), ("adv_std", "grup"), ("loss_agg", "tokens"),
                                        ("ratio", "gspo"), ("dynamic_sampling", "zero_std"),
                                        ("failed_rewards", "drop"), ("old_logprobs", "recomputed"),
                                        ("train_levels", "both")])
def test_a_mistyped_mode_fails_instead_of_changing_the_update(name, typo):
    """Through the Python API too: RLConfig refuses an unknown mode when built (not only in check()),
    and compute_advantages refuses the modes it reads (it used to treat any algo but "hi-grpo" as grpo
    and any adv_std but "group" as none)."""
    from rl3d.stages.rl.rl_config import UPDATE_MODES, RLConfig

    expected = f"--{name.replace('_', '-')} '{typo}': expected one of {', '.join(UPDATE_MODES[name])}"
    with pytest.raises(InputError, match=expected):
        RLConfig(**{name: typo})
    cfg = RLConfig()
    setattr(cfg, name, typo)  # set after building: check() still says so
    with pytest.raises(InputError, match=expected):
        cfg.check()
    if name in ("algo", "adv_std", "dynamic_sampling", "failed_rewards", "train_levels"):
        with pytest.raises(InputError, match=expected):
            compute_advantages(_traj("p", [1.0, 0.0], [0.0, 1.0]), **{name: typo})


def test_the_cli_offers_exactly_the_modes():
    import click

    from rl3d.cli.rl_step import command
    from rl3d.stages.rl.rl_config import UPDATE_MODES

    choices = {p.name: tuple(p.type.choices) for p in command.params if isinstance(p.type, click.Choice)}
    for name, values in UPDATE_MODES.items():
        if name != "dynamic_sampling":  # a free-form option: off | zero-std | min-std:X, parsed then checked
            assert choices[name] == values, name
