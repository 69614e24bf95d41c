"""The findings an experiment declares, judged arm against arm (stages/experiments/findings.py): the
statistics against hand computations, verdicts on fabricated experiment folders whose per-prompt
values are known, the refusals, the declarations of examples/ablations/, and the learning curves."""
import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import stats
from test_ablations import ROOT, calls, stub_env, write_eval, write_run

from rl3d.cli.main import main as cli
from rl3d.formats.errors import InputError
from rl3d.stages.experiments.ablations import Evaluation, heldout_curves, load_experiment
from rl3d.stages.experiments.findings import (check_paired, compare, declared_findings, finding_rows, finding_table,
                                              parse_side, power, prompts_needed, seeds_needed, verdict, welch_interval)
from rl3d.stages.experiments.summary import summarize

PROMPTS = [(f"q{i:02d}", ("spatial", "organic")[i % 2], f"object {i}") for i in range(12)]
SAMPLES = 2
BASE_CLIP = [48.0 + i for i in range(12)]   # the start's and the base arm's per-prompt CLIP score
SEED_OFFSET = {"base": {1: -0.5, 2: 0.0, 3: 0.5}, "same": {1: -1.0, 2: 0.0, 3: 1.0}}
ALT = [(-1) ** i for i in range(12)]         # +1, -1, ...: per-prompt differences that average to 0


def arm_clip(arm: str, seed: int) -> list[float]:
    """Per prompt, the CLIP score every sample of this arm's seed gets."""
    offset = SEED_OFFSET.get(arm, {}).get(seed, 0.0)
    per_prompt = {
        "base": BASE_CLIP,
        "better": [c + 3.0 + 0.5 * a for c, a in zip(BASE_CLIP, ALT)],   # +3 on every prompt, +-0.5
        "worse": [c - 3.0 for c in BASE_CLIP],
        "same": [c + 2.0 * a for c, a in zip(BASE_CLIP, ALT)],          # +-2: equal on average, noisy
        "level": [c + 0.2 * a for c, a in zip(BASE_CLIP, ALT)],         # +-0.2: equal within 1 point
    }[arm]
    return [v + offset for v in per_prompt]


def experiment(tmp_path: Path, arms=("base", "better", "worse", "same", "level"), findings=(), steps=(10,),
               seeds=(1, 2, 3)) -> Path:
    """An experiment folder: the start and every arm's seeds scored on PROMPTS (SAMPLES a prompt) at
    `steps`, CLIP per sample from arm_clip, "all attributes right" where CLIP is above 50."""
    exp = tmp_path / "exp"
    exp.mkdir(parents=True)
    (exp / "experiment.json").write_text(json.dumps({
        "experiment": "algorithm", "start_weights": "aaa", "command_env": {"SEEDS": "1 2 3"},
        "settings": {"STEPS": max(steps), "PROMPTS": 4, "GROUP": 4, "LR": 1e-4, "MINIBATCH": 16, "BETA": 0.01,
                     "BENCH_LIMIT": "", "EVAL_SAMPLES": SAMPLES, "EVAL_SEED": 101, "BENCHES": "synth-reasoning"},
        "findings": list(findings)}))

    def scored(clip_per_prompt):
        clip = {p: [c] * SAMPLES for (p, _, _), c in zip(PROMPTS, clip_per_prompt)}
        return {p: [v > 50 for v in vs] for p, vs in clip.items()}, clip

    correct, clip = scored(BASE_CLIP)
    write_eval(exp / "baseline/hi-grpo/eval/step-000000/synth-reasoning", "/p@aaa#step4000", correct,
               name="assets-policy", prompts=PROMPTS, clip=clip, config={"seed": 101, "samples_per_prompt": SAMPLES})
    for arm in arms:
        for seed in seeds:
            run = exp / "arms" / arm / f"seed-{seed}"
            for k, step in enumerate(steps):
                # a later step moves every prompt by +1 per step scored before it
                correct, clip = scored([v + k for v in arm_clip(arm, seed)])
                options = dict(prompts=PROMPTS, clip=clip, config={"seed": 101, "samples_per_prompt": SAMPLES})
                if k == 0:
                    write_run(run, arm, seed, "aaa", correct, step=step, **options)
                else:
                    write_eval(run / "eval" / f"step-{step:06d}" / "synth-reasoning",
                               f"{run}/step-{step:06d}/policy@w{seed}#step{step}", correct, **options)
    return exp


def finding(claim, arm, op, other, *metrics):
    return {"claim": claim, "arm": arm, "op": op, "other": other, "metrics": list(metrics or ["clip_score"])}


# ---------------------------------------------------------------- the statistics, by hand

def test_welch_interval_by_hand():
    w = welch_interval([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    # var 1 / 3 seeds on one side, 0 on the other: df = (1/3)^2 / ((1/3)^2 / 2) = 2
    assert w["change"] == 2.0 and w["df"] == pytest.approx(2.0)
    assert w["half"] == pytest.approx(4.302653 * math.sqrt(1 / 3), rel=1e-6)
    equal = welch_interval([1.0, 3.0], [2.0, 4.0])  # equal variances, 2 a side: df 2
    assert equal["change"] == -1.0 and equal["half"] == pytest.approx(4.302653 * math.sqrt(2 / 2 + 2 / 2), rel=1e-6)
    assert welch_interval([1.0], [0.0, 1.0])["half"] is None  # one seed: no spread to measure


def test_prompts_needed_by_hand():
    # 1.96 * 2 / sqrt(P) < 1  <=>  P > 15.37: 16
    assert prompts_needed(2.0, 1.0) == 16
    assert prompts_needed(0.1, 0.05) == math.floor((1.959964 * 2) ** 2) + 1 == 16
    assert prompts_needed(0.0, 0.05) == 1


def test_seeds_needed_by_hand():
    # v_a = v_b = 1, E = 1: nu = 2 (n - 1); n = 9: t(16) 2.1199 * sqrt(2 / 9) = 0.9993 < 1,
    # n = 8: t(14) 2.1448 * sqrt(2 / 8) = 1.0724
    assert 2.1199 * math.sqrt(2 / 9) < 1 < 2.1448 * math.sqrt(2 / 8)
    assert seeds_needed(1.0, 1.0, 1.0) == 9
    # one side without spread: nu = n - 1
    n = seeds_needed(0.0, 1.0, 0.5)
    assert stats.t.ppf(0.975, n - 1) * math.sqrt(1 / n) < 0.5 <= stats.t.ppf(0.975, n - 2) * math.sqrt(1 / (n - 1))
    assert seeds_needed(0.0, 0.0, 1.0) == 2


def test_verdicts():
    assert verdict(">", 0.01, 0.2, "spec_all_correct") == "reproduced"
    assert verdict("<", -0.2, -0.01, "spec_all_correct") == "reproduced"
    assert verdict(">", -0.2, -0.01, "spec_all_correct") == "reversed"
    assert verdict(">", -0.04, 0.03, "spec_all_correct") == "not reproduced"   # inside +-0.05
    assert verdict(">", -0.04, 0.06, "spec_all_correct") == "not separated"
    assert verdict(">", -0.9, 0.9, "clip_score") == "not reproduced"          # inside +-1 CLIP point


# ---------------------------------------------------------------- arm against arm, on fabricated folders

def test_a_clearly_better_arm_is_reproduced_a_worse_one_reversed(tmp_path):
    exp = load_experiment(experiment(tmp_path, findings=[
        finding("better helps", "better", ">", "base"), finding("worse helps", "worse", ">", "base")]))
    better, worse = finding_rows(exp)
    assert better["status"] == "compared" and better["step"] == 10 and better["prompts"] == 12
    assert better["seeds"] == better["other_seeds"] == 3
    # per prompt +3.5 / +2.5 alternately; the seeds' offsets average out per prompt
    assert better["change"] == pytest.approx(3.0) and 2.5 <= better["ci_low"] < 3.0 < better["ci_high"] <= 3.5
    assert better["improved"] == 12 and better["verdict"] == "reproduced"
    assert better["prompt_sd"] == pytest.approx(0.5 * math.sqrt(12 / 11))
    # seed means: base 48 + 5.5 + (-0.5, 0, 0.5), better 3 above with no seed offset
    assert better["seed_change"] == pytest.approx(3.0) and better["seed_var"] == 0.0
    assert better["other_seed_var"] == pytest.approx(0.25)
    assert better["seed_half"] == pytest.approx(4.302653 * math.sqrt(0.25 / 3), rel=1e-5)
    assert better["seed_separated"] and "power" not in better
    assert worse["change"] == pytest.approx(-3.0) and worse["ci_high"] == pytest.approx(-3.0)
    assert worse["verdict"] == "reversed"


def test_equal_arms_are_not_separated_with_a_power_estimate_from_the_formula(tmp_path):
    exp = load_experiment(experiment(tmp_path, findings=[finding("same helps", "same", ">", "base")]))
    (row,) = finding_rows(exp)
    assert row["change"] == pytest.approx(0.0, abs=1e-9) and row["ci_low"] < 0 < row["ci_high"]
    assert row["verdict"] == "not separated"
    # per-prompt differences +-2: s_p = 2 sqrt(12/11); effect = the minimum, 1 CLIP point
    s_p = 2 * math.sqrt(12 / 11)
    assert row["prompt_sd"] == pytest.approx(s_p)
    p = row["power"]
    assert p["effect"] == 1.0 and p["at_minimum"]
    assert p["prompts"] == math.floor((1.959964 * s_p) ** 2) + 1 == 17
    # seed means vary by the offsets: var(-1, 0, 1) = 1 and var(-0.5, 0, 0.5) = 0.25
    assert row["seed_var"] == pytest.approx(1.0) and row["other_seed_var"] == pytest.approx(0.25)
    share = 1.25 ** 2 / (1 + 0.25 ** 2)
    n = next(n for n in range(2, 100) if stats.t.ppf(0.975, (n - 1) * share) * math.sqrt(1.25 / n) < 1.0)
    assert p["seeds"] == n == 7
    md = summarize(exp.path, tmp_path / "out")["markdown"].read_text()
    assert ("| same helps | same > base | CLIP score | 10 | +0.00 [" in md
            and "| 3 x 12 | **not separated**: needs ~7 seeds or ~17 prompts (to separate 1, the minimum effect) |"
            in md)


def test_arms_equal_within_the_minimum_effect_are_not_reproduced(tmp_path):
    exp = load_experiment(experiment(tmp_path, arms=("base", "level"),
                                     findings=[finding("level helps", "level", ">", "base")]))
    (row,) = finding_rows(exp)
    assert -1 < row["ci_low"] < 0 < row["ci_high"] < 1 and row["verdict"] == "not reproduced"


def test_power_is_against_the_difference_seen_when_it_is_larger_than_the_minimum():
    c = {"metric": "spec_all_correct", "change": 0.1, "ci_low": -0.02, "ci_high": 0.22, "prompts": 48,
         "prompt_sd": 0.5, "seed_var": 0.001, "other_seed_var": 0.002, "seed_change": 0.1, "seed_half": 0.05,
         "seeds": 3, "other_seeds": 3}
    p = power(c)
    assert p["effect"] == 0.1 and not p["at_minimum"]
    assert p["prompts"] == math.floor((1.959964 * 0.5 / 0.1) ** 2) + 1 == 97
    # nu = 1.8 (n - 1): at 2 seeds t(1.8) * sqrt(0.003 / 2) > 0.1, at 3 t(3.6) * sqrt(0.001) < 0.1; the
    # seed-level interval excludes 0 already, so 3 seeds (as many as there are) is the answer
    assert stats.t.ppf(0.975, 1.8) * math.sqrt(0.0015) > 0.1 > stats.t.ppf(0.975, 3.6) * math.sqrt(0.001)
    assert p["seeds"] == seeds_needed(0.001, 0.002, 0.1) == 3


def test_steps_of_one_arm_and_the_default_step(tmp_path):
    exp = load_experiment(experiment(tmp_path, arms=("base", "better"), steps=(10, 20), findings=[
        finding("longer helps", "better@20", ">", "better@10"), finding("better helps", "better", ">", "base"),
        finding("not yet", "better@30", ">", "better@10")]))
    longer, default, pending = finding_rows(exp)
    assert (longer["step"], longer["other_step"]) == (20, 10) and longer["change"] == pytest.approx(1.0)
    assert default["step"] == default["other_step"] == 20  # the last step both were scored at
    assert pending["status"] == "not scored" and pending["missing"] == ["better@30"]
    assert pending["verdict"] == "not scored yet"
    # a side without a step takes the other side's
    c = compare(exp, parse_side("better@10", "t"), parse_side("base", "t"), "synth-reasoning", "clip_score")
    assert (c["step"], c["other_step"]) == (10, 10) and c["change"] == pytest.approx(3.0)


def test_pairing_ignores_the_level_in_the_sample_ids(tmp_path):
    """Flat GRPO's final level is "single", Hi-GRPO's "fine": the same prompt and sample index pair."""
    exp_dir = experiment(tmp_path, arms=("base",), findings=[finding("flat helps", "flat", ">", "base")])
    clip = {p: [c] * SAMPLES for (p, _, _), c in zip(PROMPTS, BASE_CLIP)}
    for seed in (1, 2, 3):
        write_run(exp_dir / "arms/flat" / f"seed-{seed}", "flat", seed, "aaa", {p: [True] * SAMPLES for p in clip},
                  step=10, prompts=PROMPTS, clip={p: [v + 1 for v in vs] for p, vs in clip.items()}, level="single")
    (row,) = finding_rows(load_experiment(exp_dir))
    assert row["change"] == pytest.approx(1.0) and row["verdict"] == "reproduced"


# ---------------------------------------------------------------- refusals

def test_an_arm_scored_on_another_prompt_set_is_refused_by_the_command(tmp_path):
    exp = experiment(tmp_path, arms=("base",), findings=[finding("odd helps", "odd", ">", "base")])
    clip = {p: [50.0] * SAMPLES for p, _, _ in PROMPTS}
    write_run(exp / "arms/odd/seed-1", "odd", 1, "aaa", {p: [True] * SAMPLES for p in clip}, step=10,
              prompts=PROMPTS, clip=clip, prompt_set="prompts-other.jsonl")
    r = CliRunner().invoke(cli, ["learning-summary", "ablations", str(exp), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    (line,) = r.output.strip().splitlines()
    assert f"{exp}/arms/odd/seed-1/eval/step-000010/synth-reasoning/prompts-other.jsonl" in line
    assert "different prompt sets" in line and not (tmp_path / "o").exists()


def test_arms_with_other_samples_or_sampling_seeds_are_refused_naming_the_file(tmp_path):
    exp = experiment(tmp_path, arms=("base",), findings=[finding("fewer helps", "fewer", ">", "base")])
    clip = {p: [50.0] for p, _, _ in PROMPTS}  # one sample a prompt, the others two
    write_run(exp / "arms/fewer/seed-1", "fewer", 1, "aaa", {p: [True] for p in clip}, step=10,
              prompts=PROMPTS, clip=clip)
    r = CliRunner().invoke(cli, ["learning-summary", "ablations", str(exp), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert f"{exp}/arms/fewer/seed-1/eval/step-000010/synth-reasoning/policy/per_sample.parquet" in r.output
    assert "do not pair" in r.output

    exp2 = experiment(tmp_path / "two", arms=("base",), findings=[finding("reseeded", "reseeded", ">", "base")])
    clip = {p: [50.0] * SAMPLES for p, _, _ in PROMPTS}
    write_run(exp2 / "arms/reseeded/seed-1", "reseeded", 1, "aaa", {p: [True] * SAMPLES for p in clip}, step=10,
              prompts=PROMPTS, clip=clip, config={"seed": 7, "samples_per_prompt": SAMPLES})
    with pytest.raises(InputError, match=r"synth-reasoning/metrics: reseeded seed 1 step 10 was scored with "
                                         r"sampling seed 7, base seed 1 step 10 with 101"):
        finding_rows(load_experiment(exp2))


def test_arms_from_other_starting_policies_are_refused(tmp_path):
    def ev(arm, start):
        out = tmp_path / f"arms/{arm}/seed-1/eval/step-000010/synth-reasoning"
        return Evaluation(arm, 1, 10, "synth-reasoning", out, tmp_path / "p", "prompts-abc.jsonl", "x",
                          [{"prompt_id": "q", "sample_id": "q-0-fine"}], start_weights=start)
    check_paired([ev("a", "aaa"), ev("b", "aaa")])
    why = (f"{tmp_path}/arms/b/seed-1/arm.json: b seed 1 step 10 was trained from weights bbb, a seed 1 step 10 "
           f"from aaa; arms from different starting policies are not compared")
    with pytest.raises(InputError, match=f"^{re.escape(why)}$"):
        check_paired([ev("a", "aaa"), ev("b", "bbb")])


def test_bad_declarations_are_one_line_errors_naming_experiment_json(tmp_path):
    for bad, why in ((finding("x", "a", ">=", "b"), "op '>=': expected '>' or '<'"),
                     (finding("x", "a@ten", ">", "b"), "side 'a@ten': expected ARM or ARM@STEP"),
                     (finding("x", "a", ">", "b", "text-reasoning:spec_all_correct"), "text-reasoning reports"),
                     ({"claim": "x", "arm": "a"}, "expected claim, arm, op, other and metrics")):
        exp = experiment(tmp_path / str(abs(hash(why))), arms=(), findings=[bad])
        with pytest.raises(InputError, match=re.escape(f"{exp}/experiment.json: finding 1")) as e:
            declared_findings(load_experiment(exp))
        assert why in str(e.value)


# ---------------------------------------------------------------- the summary and the learning curves

def test_summary_has_the_findings_table_and_the_learning_curves(tmp_path):
    exp = experiment(tmp_path, arms=("base", "better"), steps=(10, 20), findings=[
        finding("better helps", "better", ">", "base", "clip_score", "spec_all_correct")])
    paths = summarize(exp, tmp_path / "out")
    md = paths["markdown"].read_text()
    assert "### Findings" in md and "| better helps | better > base | CLIP score | 20 | +3.00 [" in md
    assert "| better helps | better > base | all attributes right | 20 |" in md
    assert "![algorithm: learning curves per arm, mean and seed band](exp_learning.png)" in md
    assert md.index("### Findings") < md.index("### synth-reasoning")
    numbers = json.loads(paths["numbers"].read_text())
    assert [f["metric"] for f in numbers["findings"]] == ["clip_score", "spec_all_correct"]
    assert numbers["findings"][0]["verdict"] == "reproduced"
    assert [p["metric"] for p in numbers["learning_curves"]] == ["spec_all_correct", "spec_accuracy", "clip_score",
                                                                  "kl"]
    image = Image.open(paths["learning"])
    assert paths["learning"].name == "exp_learning.png" and image.size[0] > 1000 and image.size[1] > 600


def test_learning_curves_are_the_seeds_mean_and_band_from_the_start(tmp_path):
    exp = load_experiment(experiment(tmp_path, arms=("base", "same"), steps=(10, 20)))
    panels = {p["metric"]: p for p in heldout_curves(exp)}
    clip = panels["clip_score"]["series"]
    start = float(np.mean(BASE_CLIP))
    # base at step 10: the start +(-0.5, 0, 0.5) a seed; at 20 one more point on every prompt
    assert clip["base"]["steps"] == [0, 10, 20] and clip["base"]["seeds"] == [1, 3, 3]
    assert clip["base"]["mean"] == pytest.approx([start, start, start + 1])
    assert clip["base"]["low"] == pytest.approx([start, start - 0.5, start + 0.5])
    assert clip["same"]["high"] == pytest.approx([start, start + 1, start + 2])
    # all attributes right: CLIP above 50, 9 of 12 prompts at the start (prompts 3-11)
    right = panels["spec_all_correct"]["series"]["base"]
    assert right["mean"][0] == pytest.approx(9 / 12) and right["low"][1] == pytest.approx(9 / 12)
    kl = panels["kl"]["series"]["same"]  # write_run's metrics: 1e-4 at step 1, 2e-3 at step 2, every seed
    assert kl["steps"] == [0, 1, 2] and kl["mean"] == pytest.approx([0.0, 1e-4, 2e-3])
    assert panels["kl"]["title"] == "KL to the starting policy, training batches"
    assert panels["spec_all_correct"]["title"] == "all attributes right, held-out synth-reasoning"


# ---------------------------------------------------------------- declarations in examples/ablations/

EXPERIMENTS = ["paradigm", "algorithm", "rewards", "scaling", "attributes"]


@pytest.mark.parametrize("script", EXPERIMENTS)
def test_every_declared_finding_names_the_scripts_arms_and_known_metrics(tmp_path, script):
    from rl3d.stages.experiments.findings import parse_metric

    env = stub_env(tmp_path, DRY_RUN="1", EXP_DIR=str(tmp_path / "exp"), SEEDS="1", STEPS="10")
    out = subprocess.run(["bash", str(ROOT / "examples/ablations" / f"{script}.sh")], env=env, check=True,
                         capture_output=True, text=True).stdout
    arms = {line.split()[1] for line in out.splitlines() if line.startswith("arm ")}
    declared = [re.match(r'finding "(.+)": (\S+) ([<>]) (\S+) on (.+)$', line)
                for line in out.splitlines() if line.startswith("finding ")]
    assert declared and all(declared)
    for m in declared:
        for side in (m[2], m[4]):
            assert parse_side(side, script).arm in arms, (script, m[1])
        for metric in m[5].split():
            parse_metric(metric, script)
    if script == "scaling":  # over-training compares one arm's steps
        assert any(m[2] == "prompts-x1@30" and m[4] == "prompts-x1@20" and m[3] == "<" for m in declared)


def test_findings_are_recorded_in_experiment_json_once_per_call(tmp_path):
    env = stub_env(tmp_path, EXP_DIR=str(tmp_path / "exp"), SEEDS="1", STEPS="1", ARMS="none",
                   BENCHES="synth-reasoning")
    script = str(ROOT / "examples/ablations/algorithm.sh")
    for _ in range(2):  # a rerun records them anew, not twice
        subprocess.run(["bash", script], env=env, check=True, capture_output=True)
        meta = json.loads((tmp_path / "exp/experiment.json").read_text())
        assert len(meta["findings"]) == 6
    assert meta["findings"][3] == {"claim": "Removing the KL term hurts", "arm": "base", "op": ">", "other": "beta0",
                                   "metrics": ["spec_all_correct", "clip_score"]}
    assert not any(c.startswith("rl-step") for c in calls(tmp_path))


def test_a_finding_with_a_bad_operator_stops_the_script(tmp_path):
    common = ROOT / "examples/ablations/common.sh"
    script = (f'source <(sed -n "/^finding()/,/^}}/p" {common}); DRY_RUN=1; '
              f'finding "x" a ">=" b clip_score')
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert r.returncode == 2 and "OP is '>' or '<', not '>='" in r.stderr


def test_one_seed_an_arm_says_the_seed_spread_is_not_measured(tmp_path):
    exp = load_experiment(experiment(tmp_path, arms=("base", "better", "same"), seeds=(1,), findings=[
        finding("better helps", "better", ">", "base"), finding("same helps", "same", ">", "base")]))
    better, same = finding_rows(exp)
    assert better["seed_half"] is None and better["power"]["seeds"] is None
    lines = finding_table([better, same])
    assert lines[2].endswith("| 1 x 12 | **reproduced**; one seed an arm: the seed spread is not measured |")
    assert same["verdict"] == "not separated" and same["power"]["prompts"] == 17
    assert lines[3].endswith("**not separated**: needs ~17 prompts (to separate 1, the minimum effect); one seed an "
                             "arm: the seed spread is not measured |")
