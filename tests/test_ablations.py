"""examples/ablations/: the experiment scripts' plans (a stub rl3d), and the summariser on a
fabricated experiment folder, including its refusal to mix runs."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from rl3d.cli.main import main as cli
from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.stages.experiments.ablations import load_experiment
from rl3d.stages.experiments.summary import summarize

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["common.sh", "paradigm.sh", "algorithm.sh", "rewards.sh", "scaling.sh", "attributes.sh"]

STUB = r"""#!/usr/bin/env bash
# stands in for rl3d: logs the call and writes what a finished stage leaves behind
echo "$*" >> "$LOG"
echo "${CUDA_VISIBLE_DEVICES:-none} $*" >> "$LOG.gpu"
out=""; prev=""
for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
case $1 in
  rl-step) sleep "${STUB_STEP_SECONDS:-0}";;
esac
case $1 in
  gen|render|reward) mkdir -p "$out/_shards"; touch "$out/_shards/00000-of-00001.json";;
  rl-step) mkdir -p "$out"; touch "$out/rl_step.json";;
  eval) mkdir -p "$out"; touch "$out/report.md";;
  train) steps=""; save=""; prev=""  # a checkpoint every --save-every steps and at the last
    for a in "$@"; do [ "$prev" = --steps ] && steps=$a; [ "$prev" = --save-every ] && save=$a; prev=$a; done
    for ((n = 1; n <= steps; n++)); do
      if [ $((n % save)) -eq 0 ] || [ "$n" -eq "$steps" ]; then
        mkdir -p "$out/checkpoints/step-$(printf %06d "$n")"; touch "$out/checkpoints/step-$(printf %06d "$n")/train_state.json"
      fi
    done;;
esac
"""


def stub_env(tmp_path, **extra):
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    (stub_dir / "rl3d").write_text(STUB)
    (stub_dir / "rl3d").chmod(0o755)
    return {**os.environ, "LOG": str(tmp_path / "calls.log"), "RL3D": "rl3d",
            "PATH": f"{stub_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


def calls(tmp_path):
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(ROOT / "examples/ablations" / script)], check=True)


def test_learning_run_passes_the_arm_knobs(tmp_path):
    env = stub_env(tmp_path, RUN=str(tmp_path / "run"), STEPS="1", HELDOUT="0", POLICY0="start", MODE="flat", LAMBDA="0",
                   LOSS_AGG="sequence", RATIO="sequence", CLIP_HIGH="0.2", DYNAMIC="zero-std", BETA="0",
                   REWARDS="r.toml", GEN_SEED="20000", PROMPT_SEED="500", TEMPERATURE="1.2", TOP_P="1.0",
                   TRAIN_LEVELS="coarse")
    subprocess.run(["bash", str(ROOT / "examples/learning_run.sh")], env=env, check=True, capture_output=True)
    c = calls(tmp_path)
    gen = [x for x in c if x.startswith("gen")]
    assert len(gen) == 1  # no held-out scoring with HELDOUT=0
    assert "--mode flat" in gen[0] and "--seed 20001" in gen[0] and "--temperature 1.2 --top-p 1.0" in gen[0]
    assert any(x.startswith("synth") and "--seed 501" in x and "--split train" in x for x in c)
    assert "--config r.toml" in next(x for x in c if x.startswith("reward"))
    rl = next(x for x in c if x.startswith("rl-step"))
    for flag in ("--algo grpo", "--lambda 0", "--loss-agg sequence", "--ratio sequence", "--clip-high 0.2",
                 "--dynamic-sampling zero-std", "--beta 0", "--train-levels coarse"):
        assert flag in rl


def test_learning_run_defaults_are_the_recipe(tmp_path):
    env = stub_env(tmp_path, RUN=str(tmp_path / "run"), STEPS="1", EVAL_SEEDS="101", POLICY0="start")
    subprocess.run(["bash", str(ROOT / "examples/learning_run.sh")], env=env, check=True, capture_output=True)
    c = calls(tmp_path)
    step_gen = next(x for x in c if x.startswith("gen") and "step-000001" in x)
    assert "--policy start " in step_gen and "--seed 1 " in step_gen and "--mode hi-grpo" in step_gen
    assert "--config default" in next(x for x in c if x.startswith("reward") and "step-000001" in x)
    rl = next(x for x in c if x.startswith("rl-step"))
    assert "--algo hi-grpo --lambda 1.0 --loss-agg token --ratio token --clip-low 0.2 --clip-high 0.28" in rl


def test_learning_run_with_the_train_engine_is_one_rl3d_train_and_scores_its_checkpoints(tmp_path):
    env = stub_env(tmp_path, RUN=str(tmp_path / "run"), STEPS="3", EVAL_EVERY="2", EVAL_SEEDS="101", POLICY0="start",
                   ENGINE="train", GEN_SEED="20000", MODE="flat", BETA="0", STOP_AFTER="500")
    subprocess.run(["bash", str(ROOT / "examples/learning_run.sh")], env=env, check=True, capture_output=True)
    c = calls(tmp_path)
    train = [x for x in c if x.startswith("train")]
    assert len(train) == 1 and not any(x.startswith(("rl-step", "synth --n 32")) for x in c)
    for flag in ("--prompts synth", "--policy start", "--steps 3", "--seed 20000", "--mode flat", "--beta 0",
                 "--save-every 2", "--keep-checkpoints 0", "--no-sheet", "--rewards flat", "--time-limit "):
        assert flag in train[0], flag
    scored = [x.split("--policy ")[1].split()[0] for x in c if x.startswith("gen")]
    run = tmp_path / "run"
    assert scored == ["start", f"{run}/checkpoints/step-000002", f"{run}/checkpoints/step-000003"]
    n = len(c)
    subprocess.run(["bash", str(ROOT / "examples/learning_run.sh")], env=env, check=True, capture_output=True)
    assert [x.split()[0] for x in calls(tmp_path)[n:]] == ["synth", "train", "learning-summary"]


def test_an_experiment_with_the_train_engine_scores_the_loop_checkpoints(tmp_path):
    env = stub_env(tmp_path, EXP_DIR=str(tmp_path / "exp"), SEEDS="1", STEPS="2", ARMS="base",
                   BENCHES="synth-reasoning", ENGINE="train")
    subprocess.run(["bash", str(ROOT / "examples/ablations/algorithm.sh")], env=env, check=True, capture_output=True)
    c = calls(tmp_path)
    assert sum(x.startswith("train") for x in c) == 1 and not any(x.startswith("rl-step") for x in c)
    assert any(x.startswith("eval") and "arms/base/seed-1/checkpoints/step-000002 " in x for x in c)
    assert json.loads((tmp_path / "exp/experiment.json").read_text())["settings"]["ENGINE"] == "train"
    subprocess.run(["bash", str(ROOT / "examples/ablations/algorithm.sh")], env=env, check=True, capture_output=True)
    assert calls(tmp_path) == c  # trained and scored: nothing reruns


def test_dry_run_lists_every_arm_and_its_eval(tmp_path):
    env = stub_env(tmp_path, DRY_RUN="1", EXP_DIR=str(tmp_path / "exp"), SEEDS="1 2 3")
    out = subprocess.run(["bash", str(ROOT / "examples/ablations/paradigm.sh")], env=env, check=True,
                         capture_output=True, text=True).stdout
    arms = [line.split()[1] for line in out.splitlines() if line.startswith("arm ")]
    assert sorted(set(arms)) == ["flat-mesh-only", "flat-reasoning", "hi-grpo", "hi-grpo-lambda0",
                                 "level1-only", "level2-only"]
    assert all(arms.count(a) == 3 for a in set(arms))
    flat = next(line for line in out.splitlines() if line.startswith("arm flat-reasoning seed 1"))
    assert "MODE=flat" in flat and "GEN_SEED=10000" in flat
    evals = [line.strip() for line in out.splitlines() if line.strip().startswith("rl3d eval")]
    assert any("--bench text-reasoning" in e for e in evals)
    assert all("--mode flat" in e for e in evals if "/flat" in e.split("--out ")[1])
    assert not (tmp_path / "exp").exists()  # a dry run writes nothing


def test_algorithm_runs_gspo_with_its_own_clip_range_and_with_the_base_one(tmp_path):
    env = stub_env(tmp_path, DRY_RUN="1", EXP_DIR=str(tmp_path / "exp"), SEEDS="1")
    out = subprocess.run(["bash", str(ROOT / "examples/ablations/algorithm.sh")], env=env, check=True,
                         capture_output=True, text=True).stdout
    arm = {line.split()[1]: line for line in out.splitlines() if line.startswith("arm ")}
    assert "RATIO=sequence CLIP_LOW=0.0003 CLIP_HIGH=0.0004" in arm["gspo"]
    assert "RATIO=sequence" in arm["gspo-ratio"] and "CLIP_LOW" not in arm["gspo-ratio"]


def test_experiment_runs_resumes_and_refuses_other_settings(tmp_path):
    env = stub_env(tmp_path, EXP_DIR=str(tmp_path / "exp"), SEEDS="1 2", STEPS="1", ARMS="base beta0",
                   BENCHES="synth-reasoning")
    script = str(ROOT / "examples/ablations/algorithm.sh")
    subprocess.run(["bash", script], env=env, check=True, capture_output=True)
    first = calls(tmp_path)
    assert sum(x.startswith("rl-step") for x in first) == 4  # 2 arms x 2 seeds x 1 step
    assert sum(x.startswith("eval") for x in first) == 5    # the start + 4 runs
    arm = json.loads((tmp_path / "exp/arms/beta0/seed-2/arm.json").read_text())
    assert arm["knobs"] == {"BETA": "0"} and arm["baseline"] == "hi-grpo" and arm["seed"] == 2
    assert "--beta 0 " in next(x for x in first if x.startswith("rl-step") and "beta0/seed-1" in x)
    subprocess.run(["bash", script], env=env, check=True, capture_output=True)
    assert calls(tmp_path) == first  # everything finished: nothing reruns
    r = subprocess.run(["bash", script], env={**env, "LR": "3e-4"}, capture_output=True, text=True)
    assert r.returncode == 2 and "holds runs of other settings" in r.stderr
    # a packed folder (no checkpoints) goes on elsewhere without retraining its scored runs
    subprocess.run(["bash", str(ROOT / "examples/ablations/pack.sh"), str(tmp_path / "exp"), str(tmp_path / "pk")],
                   check=True, capture_output=True)
    assert not list((tmp_path / "pk/exp").glob("arms/*/seed-*/step-*/policy"))
    subprocess.run(["bash", script], env={**env, "EXP_DIR": str(tmp_path / "pk/exp")}, check=True, capture_output=True)
    assert calls(tmp_path) == first


def test_experiment_stops_at_its_time_budget(tmp_path):
    env = stub_env(tmp_path, EXP_DIR=str(tmp_path / "exp"), SEEDS="1", STEPS="1", ARMS="base",
                   BENCHES="synth-reasoning", STOP_AFTER="1")
    r = subprocess.run(["bash", "-c", f"sleep 1.1; SECONDS=2 bash {ROOT}/examples/ablations/algorithm.sh"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 3 and "rerun to continue" in r.stderr
    assert not any(x.startswith("rl-step") for x in calls(tmp_path))


def test_parallel_jobs_run_every_seed_once_spread_over_the_gpus(tmp_path):
    env = stub_env(tmp_path, EXP_DIR=str(tmp_path / "exp"), SEEDS="1 2 3", STEPS="2", ARMS="base top-p-1",
                   BENCHES="synth-reasoning", JOBS="3", GPUS="4 7", SHARDS="1")
    script = str(ROOT / "examples/ablations/attributes.sh")
    r = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    first = calls(tmp_path)
    assert sum(x.startswith("rl-step") for x in first) == 12  # 2 arms x 3 seeds x 2 steps
    assert sum(x.startswith("eval") for x in first) == 7     # the start + 6 runs
    for arm in ("base", "top-p-1"):
        for seed in (1, 2, 3):
            assert (tmp_path / f"exp/arms/{arm}/seed-{seed}/eval/step-000002/synth-reasoning/report.md").exists()
    gpu_of = [line.split()[0] for line in (tmp_path / "calls.log.gpu").read_text().splitlines()]
    assert set(gpu_of) == {"4", "7"}  # slots 0 and 2 on the first card, slot 1 on the second
    top_p_gens = [x for x in first if x.startswith("gen") and "top-p-1/" in x]
    assert len(top_p_gens) == 6 and all("--top-p 1.0" in x for x in top_p_gens)
    subprocess.run(["bash", script], env=env, check=True, capture_output=True)
    assert calls(tmp_path) == first  # everything finished: nothing reruns


def test_parallel_jobs_stop_at_the_time_budget(tmp_path):
    env = stub_env(tmp_path, EXP_DIR=str(tmp_path / "exp"), SEEDS="1 2", STEPS="1", ARMS="base",
                   BENCHES="synth-reasoning", STOP_AFTER="1", JOBS="2", GPUS="")
    r = subprocess.run(["bash", "-c", f"sleep 1.1; SECONDS=2 bash {ROOT}/examples/ablations/attributes.sh"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 3 and "rerun to continue" in r.stderr + r.stdout
    assert not any(x.startswith("rl-step") for x in calls(tmp_path))


def test_a_run_scored_at_several_steps_scores_each_while_later_steps_train(tmp_path):
    env = stub_env(tmp_path, EXP_DIR=str(tmp_path / "exp"), SEEDS="1", STEPS="1", ARMS="prompts-x1",
                   BENCHES="synth-reasoning", STUB_STEP_SECONDS="0.5", SCORE_POLL="0.05")
    script = str(ROOT / "examples/ablations/scaling.sh")
    r = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    first = calls(tmp_path)
    run = tmp_path / "exp/arms/prompts-x1/seed-1"
    for n in (1, 2, 3):  # x1 prompts at 3 x STEPS steps, scored at STEPS, 2 STEPS and 3 STEPS
        assert (run / f"eval/step-00000{n}/synth-reasoning/report.md").exists()
    order = [x.split()[0] + (" 1" if "step-000001/policy" in x else "") for x in first
             if x.startswith("eval") and "prompts-x1" in x or x.startswith("rl-step") and "step-000003/policy" in x]
    assert order.index("eval 1") < order.index("rl-step")  # step 1 scored before step 3 was trained
    assert sum(x.startswith("eval") and "prompts-x1" in x for x in first) == 3  # each step once
    subprocess.run(["bash", script], env=env, check=True, capture_output=True)
    assert calls(tmp_path) == first


# ---------------------------------------------------------------- the summariser

PROMPTS = [("p0", "spatial", "a red cube"), ("p1", "spatial", "a pink tree"), ("p2", "organic", "a blue cat")]


def write_eval(d: Path, policy_id: str, correct: dict[str, list[bool]], prompt_set: str = "prompts-abc.jsonl",
               name: str = "policy", prompts=PROMPTS, clip: dict[str, list[float]] | None = None,
               config: dict | None = None, level: str = "fine"):
    """One fabricated `rl3d eval` output: per_sample rows (spec_all_correct per sample), metrics, renders;
    eval names the policy's folder after the policy dir (step-N/policy -> policy). `clip`: each sample's
    CLIP score per prompt (default 50, 51 when right); `config`: the eval's options as its metrics
    table records them (its sampling seed); `level`: the final level in the sample ids."""
    (d / name).mkdir(parents=True)
    (d / "report.md").write_text("report")
    (d / prompt_set).write_text("\n".join(json.dumps({"prompt_id": p, "category": c, "prompt": t})
                                          for p, c, t in prompts))
    rows, renders = [], []
    for pid, cat, _ in prompts:
        for i, ok in enumerate(correct[pid]):
            sid = f"{pid}-{i}-{level}"
            rows.append({"sample_id": sid, "prompt_id": pid, "category": cat, "status": "ok",
                         "spec_all_correct": ok, "spec_accuracy": 1.0 if ok else 0.5,
                         "clip_score": clip[pid][i] if clip else 50.0 + ok})
            img = d / name / "renders" / "_images" / f"{sid}.png"
            img.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), "red" if ok else "gray").save(img)
            renders.append({"sample_id": sid, "view": 0, "azimuth": 0.0, "elevation": 0.0,
                            "image_path": f"_images/{sid}.png", "status": "ok", "message": ""})
    pq.write_table(pa.Table.from_pylist(rows), d / name / "per_sample.parquet")
    pq.write_table(pa.Table.from_pylist(renders), d / name / "renders" / "part-00000-of-00001.parquet")
    (d / "metrics").mkdir()
    metrics = pa.table({"name": ["all/spec_all_correct"], "value": [0.5], "policy_id": [policy_id]})
    if config is not None:
        metrics = tables.with_metadata(metrics, "metrics", config)
    pq.write_table(metrics, d / "metrics" / "part-00000-of-00001.parquet")


def write_run(run: Path, arm: str, seed: int, start: str, correct, experiment="algorithm", knobs=None, step=2,
              **eval_options):
    """A fabricated run of an arm: arm.json, its first step's samples table (the starting policy),
    metrics.parquet, wall.tsv and the evaluation of its step `step` (write_eval's `eval_options`)."""
    run.mkdir(parents=True)
    (run / "arm.json").write_text(json.dumps({"experiment": experiment, "arm": arm, "seed": seed,
                                              "baseline": "hi-grpo", "mode": "hi-grpo", "knobs": knobs or {}}))
    gen = tables.with_metadata(pa.table({"sample_id": ["x"]}), "samples", policy=f"/p@{start}#step0")
    (run / "step-000001" / "gen").mkdir(parents=True)
    pq.write_table(gen, run / "step-000001" / "gen" / "part-00000-of-00001.parquet")
    pq.write_table(pa.table({"step": [1.0, 1.0, 1.0, 2.0, 2.0, 2.0], "name": ["reward_mean_fine", "kl", "entropy"] * 2,
                             "value": [2.7, 1e-4, 0.02, 2.8 + seed / 100, 2e-3, 0.03]}), run / "metrics.parquet")
    (run / "wall.tsv").write_text("train\t100\tNVIDIA H100 80GB HBM3\n")
    write_eval(run / "eval" / f"step-{step:06d}" / "synth-reasoning",
               f"{run}/step-{step:06d}/policy@w{seed}#step{step}", correct, **eval_options)


def fabricated(tmp_path, start="aaa", baseline="aaa") -> Path:
    exp = tmp_path / "exp"
    exp.mkdir(parents=True)
    (exp / "experiment.json").write_text(json.dumps({
        "experiment": "algorithm", "start_weights": "aaa", "command_env": {"SEEDS": "1 2 3"},
        "settings": {"STEPS": 2, "PROMPTS": 4, "GROUP": 4, "LR": 1e-4, "MINIBATCH": 16, "BETA": 0.01,
                     "BENCH_LIMIT": "", "EVAL_SAMPLES": 2, "EVAL_SEED": 101}}))
    (exp / "baseline" / "hi-grpo").mkdir(parents=True)
    write_eval(exp / "baseline" / "hi-grpo" / "eval" / "step-000000" / "synth-reasoning", f"/p@{baseline}#step4000",
               {"p0": [True, False], "p1": [False, False], "p2": [True, True]}, name="assets-policy")
    # seed s gets one more prompt right than the start; base: p1 fixed in seeds 1-2, p0 fully right in 3
    outcomes = {1: {"p0": [True, False], "p1": [True, True], "p2": [True, True]},
                2: {"p0": [True, False], "p1": [True, False], "p2": [True, True]},
                3: {"p0": [True, True], "p1": [False, False], "p2": [True, True]}}
    for s, c in outcomes.items():
        write_run(exp / "arms" / "base" / f"seed-{s}", "base", s, start, c)
    return exp


def test_summary_numbers_tables_and_images(tmp_path):
    exp = fabricated(tmp_path)
    paths = summarize(exp, tmp_path / "out")
    numbers = json.loads(paths["numbers"].read_text())["results"]["synth-reasoning"]
    start, base = numbers[0], numbers[1]
    assert start["arm"] == "start (hi-grpo)" and start["spec_all_correct"]["mean"] == pytest.approx(0.5)
    per_seed = [5 / 6, 4 / 6, 4 / 6]
    assert base["arm"] == "base" and base["seeds"] == 3 and base["step"] == 2
    assert base["spec_all_correct"]["mean"] == pytest.approx(np.mean(per_seed))
    assert base["spec_all_correct"]["half"] == pytest.approx(4.303 * np.std(per_seed, ddof=1) / np.sqrt(3))
    paired = base["spec_all_correct"]["paired"]
    # per prompt, seeds pooled: p0 4/6 - 1/2, p1 3/6 - 0, p2 1 - 1
    assert paired["prompts"] == 3 and paired["change"] == pytest.approx((1 / 6 + 1 / 2 + 0) / 3)
    assert paired["improved"] == 2
    assert base["mesh_decoded"]["mean"] == pytest.approx(1.0)  # every fabricated sample decoded
    md = paths["markdown"].read_text()
    assert "| base | 2 | 3 | 0.722 ± " in md
    assert "| start (hi-grpo) | 1.00 | 0.25 |" in md  # per category: organic, spatial
    assert "NVIDIA H100 80GB HBM3" in md and "bash examples/ablations/algorithm.sh" in md
    assert Image.open(paths["curves"]).size[0] > 100 and Image.open(paths["renders"]).size[0] > 100


def test_a_run_not_scored_is_named_and_kept_out_of_the_tables(tmp_path):
    exp = fabricated(tmp_path)
    run = exp / "arms" / "beta0" / "seed-1"
    write_run(run, "beta0", 1, "aaa", {"p0": [True], "p1": [True], "p2": [True]})
    import shutil
    shutil.rmtree(run / "eval")  # trained, then stopped before its evaluation finished
    md = summarize(exp, tmp_path / "out")["markdown"].read_text()
    assert "seeds per arm (scored): base 3, beta0 0" in md
    assert "Not scored yet (the tables hold only the steps scored; training curves are drawn): " \
           "beta0 seed 1 (step 2; reached step 1)." in md
    assert "| beta0 | 2 |" not in md


def test_a_run_scored_at_some_of_its_steps_is_named_with_the_steps_left(tmp_path):
    exp = fabricated(tmp_path)
    # a 6-step arm scored at 2, 4 and 6, stopped before its last evaluation
    run = exp / "arms" / "longer" / "seed-1"
    write_run(run, "longer", 1, "aaa", {"p0": [True], "p1": [True], "p2": [True]}, knobs={"STEPS": "6", "EVAL_AT": "2 4 6"})
    write_eval(run / "eval" / "step-000004" / "synth-reasoning", f"{run}/step-000004/policy@w1#step4",
               {"p0": [True], "p1": [False], "p2": [True]})
    md = summarize(exp, tmp_path / "out")["markdown"].read_text()
    assert "longer seed 1 (step 6; reached step 1)." in md
    assert "| longer | 2 | 1 |" in md and "| longer | 4 | 1 |" in md  # its scored steps are in the tables


def test_a_run_scored_on_some_of_the_benchmarks_is_named_with_those_left(tmp_path):
    exp = fabricated(tmp_path)
    meta = json.loads((exp / "experiment.json").read_text())
    meta["settings"]["BENCHES"] = "synth-reasoning text-reasoning"
    (exp / "experiment.json").write_text(json.dumps(meta))
    run = exp / "arms" / "base" / "seed-1"  # seeds 2 and 3 scored on synth-reasoning only
    write_eval(run / "eval" / "step-000002" / "text-reasoning", f"{run}/step-000002/policy@w1#step2",
               {"p0": [True], "p1": [True], "p2": [True]})
    md = summarize(exp, tmp_path / "out")["markdown"].read_text()
    assert "base seed 2 (step 2 text-reasoning; reached step 1), base seed 3 (step 2 text-reasoning; " in md
    assert "base seed 1 (" not in md and "| base | 2 | 3 | 0.722 ± " in md


def test_decode_failures_are_a_metric_of_their_own():
    from rl3d.stages.experiments.ablations import sample_value

    assert sample_value({"status": "ok", "clip_score": 50.0}, "mesh_decoded") == 1.0
    failed = {"status": "decode_error", "clip_score": None}  # other metrics leave a failed sample out
    assert sample_value(failed, "mesh_decoded") == 0.0 and sample_value(failed, "clip_score") is None


def test_summary_by_command(tmp_path):
    exp = fabricated(tmp_path)
    r = CliRunner().invoke(cli, ["learning-summary", "ablations", str(exp), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    # named after the folder: the same experiment at other sizes in another folder keeps its own files
    assert (tmp_path / "o" / "exp.md").exists() and "exp_renders.png" in r.output
    assert not (tmp_path / "o" / "algorithm.md").exists()
    assert (tmp_path / "o" / "exp.md").read_text().startswith("## Experiment: algorithm (folder exp)\n")


def test_refuses_a_run_of_another_experiment(tmp_path):
    exp = fabricated(tmp_path)
    write_run(exp / "arms" / "stray" / "seed-1", "stray", 1, "aaa", {"p0": [True], "p1": [True], "p2": [True]},
              experiment="rewards")
    with pytest.raises(InputError, match="experiment 'rewards', not 'algorithm'"):
        load_experiment(exp)


def test_refuses_a_run_from_another_starting_policy(tmp_path):
    exp = fabricated(tmp_path)
    write_run(exp / "arms" / "beta0" / "seed-1", "beta0", 1, "bbb", {"p0": [True], "p1": [True], "p2": [True]})
    with pytest.raises(InputError, match="not the experiment's starting weights aaa"):
        load_experiment(exp)
    r = CliRunner().invoke(cli, ["learning-summary", "ablations", str(exp), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "starting" in r.output


def test_a_malformed_wall_time_row_is_a_one_line_error(tmp_path):
    exp = fabricated(tmp_path)
    wall = exp / "arms" / "base" / "seed-2" / "wall.tsv"
    wall.write_text("train\t100\tNVIDIA H200\nCPU (64 cores)\n")
    r = CliRunner().invoke(cli, ["learning-summary", "ablations", str(exp), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert f"{wall}: row 2: expected KIND<tab>SECONDS<tab>CARD" in r.output and "Traceback" not in r.output


def test_device_name_is_one_line_on_a_machine_of_several_cards(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nfor i in 1 2 3 4; do echo 'NVIDIA H200'; done\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    common = ROOT / "examples/ablations/common.sh"
    script = f'set -euo pipefail; source <(sed -n "/^device_name()/,/^}}/p" {common}); device_name'
    r = subprocess.run(["bash", "-c", script], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                       capture_output=True, text=True, check=True)
    assert r.stdout == "NVIDIA H200\n"
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 9\n")
    r = subprocess.run(["bash", "-c", script], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                       capture_output=True, text=True, check=True)
    assert r.stdout.startswith("CPU (") and r.stdout.count("\n") == 1


def test_refuses_a_baseline_of_other_weights_and_other_prompt_sets(tmp_path):
    exp = fabricated(tmp_path, baseline="ccc")
    with pytest.raises(InputError, match="baseline policy"):
        load_experiment(exp)
    exp2 = fabricated(tmp_path / "two")
    write_eval(exp2 / "arms" / "base" / "seed-1" / "eval" / "step-000004" / "synth-reasoning", "/q@w#step4",
               {"p0": [True], "p1": [True], "p2": [True]}, prompt_set="prompts-other.jsonl")
    with pytest.raises(InputError, match="different prompt sets"):
        load_experiment(exp2)


def test_group_spread_finds_where_the_signal_is():
    from rl3d.stages.experiments.ablations import group_spread

    def row(pid, i, total, spec_raw, color_ok):
        checks = [{"attribute": "color.body", "passed": color_ok}, {"attribute": "params.count", "passed": True}]
        return {"prompt_id": pid, "sample_index": i, "level": "fine", "total": total, "spec": spec_raw,
                "spec_raw": spec_raw, "clip_score": 0.5, "spec_details": json.dumps({"checks": checks})}
    rows = [row("a", 0, 2.0, 1.0, True), row("a", 1, 1.5, 0.5, False),   # mixed: the signal
            row("b", 0, 1.5, 0.5, False), row("b", 1, 1.5, 0.5, False)]  # the same mistake twice: none
    s = group_spread(rows)["fine"]
    assert s["groups"] == 2 and s["std_total"] == pytest.approx(0.125) and s["std_clip_score"] == 0.0
    assert s["std_spec"] == pytest.approx(0.125) and s["all_right_rate"] == 0.25
    assert s["groups_all_right_mixed"] == 0.5 and s["groups_all_right_none"] == 0.5
    assert s["checks_color_mixed"] == 0.5 and s["checks_color_all_fail"] == 0.5 and s["checks_params_mixed"] == 0.0


def test_nucleus_frozen_counts_tokens_top_p_could_not_vary():
    from rl3d.stages.experiments.ablations import nucleus_frozen

    # prompt of 2 tokens, 2 reasoning tokens, <mesh-start> + 3 mesh tokens; top_p 0.9
    row = {"level": "fine", "prompt_len": 2, "reasoning_start": 2, "reasoning_end": 4, "mesh_start": 4,
           "mesh_end": 8, "top_p": 0.9, "logprobs": [np.log(0.5), np.log(0.95), 0.0, np.log(0.99), np.log(0.2), 0.0]}
    out = nucleus_frozen([row])
    assert out[("fine", "reasoning")]["frozen"] == 0.5 and out[("fine", "reasoning")]["tokens"] == 2
    assert out[("fine", "mesh")]["tokens"] == 4 and out[("fine", "mesh")]["frozen"] == 0.75


def test_ablation_reward_files_load():
    from rl3d.stages.rewards.reward_config import load_config

    files = sorted((ROOT / "examples/ablations/rewards").glob("*.toml"))
    assert {f.stem for f in files} >= {"clip", "spec", "geometry", "clip-spec", "all-right-bonus"}
    configs = {f.stem: load_config(f) for f in files}
    assert {t.backend for lv in configs["spec"].levels.values() for t in lv} == {"spec"}
    bonus = {t.name: t for t in configs["all-right-bonus"].levels["fine"]}
    assert bonus["spec_all"].options == {"score": "all"} and bonus["spec_all"].weight == 1.0
    assert set(bonus) - {"spec_all"} == {t.name for t in load_config("default").levels["fine"]}


def test_pack_keeps_scores_of_a_policy_folder_of_any_name(tmp_path):
    exp = tmp_path / "exp"
    (exp / "experiment.json").parent.mkdir(parents=True)
    (exp / "experiment.json").write_text("{}")
    for policy in ("policy", "mesh-only"):  # eval names its folder after the policy's directory
        ev = exp / f"baseline/{policy}/eval/step-000000/synth-reasoning/{policy}"
        (ev / "renders/_images/s-0-fine").mkdir(parents=True)
        for name in ("per_sample.parquet", "renders/part-00000.parquet", "model.safetensors",
                     *(f"renders/_images/s-0-fine/view-0{v}.png" for v in range(4))):
            (ev / name).write_text("x")
    subprocess.run(["bash", str(ROOT / "examples/ablations/pack.sh"), str(exp), str(tmp_path / "pk")],
                   check=True, capture_output=True)
    for policy in ("policy", "mesh-only"):
        ev = tmp_path / f"pk/exp/baseline/{policy}/eval/step-000000/synth-reasoning/{policy}"
        assert (ev / "per_sample.parquet").exists() and (ev / "renders/part-00000.parquet").exists()
        assert len(list((ev / "renders/_images/s-0-fine").glob("view-*.png"))) == 4
        assert not (ev / "model.safetensors").exists()


def test_a_packed_run_that_must_train_again_starts_empty(tmp_path):
    env = stub_env(tmp_path, EXP_DIR=str(tmp_path / "exp"), SEEDS="1 2", STEPS="1", ARMS="base",
                   BENCHES="synth-reasoning", SHARDS="1")
    script = str(ROOT / "examples/ablations/attributes.sh")
    subprocess.run(["bash", script], env=env, check=True, capture_output=True)
    for seed in (1, 2):  # the stub leaves no files pack keeps from a step: give each run a training table
        rewards = tmp_path / f"exp/arms/base/seed-{seed}/step-000001/rewards/part-00000-of-00001.parquet"
        rewards.parent.mkdir(parents=True, exist_ok=True)
        rewards.write_text(f"attempt one, seed {seed}")
    subprocess.run(["bash", str(ROOT / "examples/ablations/pack.sh"), str(tmp_path / "exp"), str(tmp_path / "pk")],
                   check=True, capture_output=True)
    packed = tmp_path / "pk/exp"
    assert (packed / "arms/base/seed-1/PACKED").exists()
    (packed / "arms/base/seed-2/eval/step-000001/synth-reasoning/report.md").unlink()  # seed 2 was not scored
    (tmp_path / "calls.log").unlink()
    r = subprocess.run(["bash", script], env={**env, "EXP_DIR": str(packed)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    trained = [c for c in calls(tmp_path) if c.startswith("rl-step")]
    assert len(trained) == 1 and "seed-2" in trained[0]  # the scored seed 1 is kept as it is
    assert (packed / "arms/base/seed-1/PACKED").exists()
    assert (packed / "arms/base/seed-1/step-000001/rewards/part-00000-of-00001.parquet").exists()
    fresh = packed / "arms/base/seed-2"
    assert not (fresh / "PACKED").exists() and (fresh / "step-000001/policy/rl_step.json").exists()
    assert not (fresh / "step-000001/rewards/part-00000-of-00001.parquet").exists()  # attempt one's table moved
    (aside,) = (packed / "stale/base").glob("seed-2.*")
    assert (aside / "step-000001/rewards/part-00000-of-00001.parquet").read_text() == "attempt one, seed 2"
    assert "moved to" in r.stdout + r.stderr


def test_pack_with_checkpoints_lets_a_stopped_run_continue(tmp_path):
    """pack.sh --checkpoints keeps what a run of rl3d train needs to go on (its settings and its newest
    checkpoint), so the rerun continues it instead of training it again; a finished, scored run keeps
    no checkpoint and its mark; an unknown option exits 2."""
    env = stub_env(tmp_path, EXP_DIR=str(tmp_path / "exp"), SEEDS="1 2", STEPS="2", ARMS="base",
                   BENCHES="synth-reasoning", ENGINE="train")
    script = str(ROOT / "examples/ablations/algorithm.sh")
    subprocess.run(["bash", script], env=env, check=True, capture_output=True)
    runs = {s: tmp_path / f"exp/arms/base/seed-{s}" for s in (1, 2)}
    for run in runs.values():
        (run / "train.json").write_text('{"settings": {}}')
    # seed 2 stopped by its time budget after step 1: its newest checkpoint is step 1, nothing scored
    shutil.rmtree(runs[2] / "checkpoints/step-000002")
    shutil.rmtree(runs[2] / "eval/step-000002")
    one = runs[2] / "checkpoints/step-000001"
    one.mkdir(parents=True)
    (one / "train_state.json").write_text('{"step": 1}')
    (one / "model.safetensors").write_text("weights after step 1")
    pack = str(ROOT / "examples/ablations/pack.sh")
    bad = subprocess.run(["bash", pack, str(tmp_path / "exp"), str(tmp_path / "pk"), "--all"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
    subprocess.run(["bash", pack, str(tmp_path / "exp"), str(tmp_path / "pk"), "--checkpoints"],
                   env=env, check=True, capture_output=True)  # the environment's python3 holds rl3d
    packed = tmp_path / "pk/exp/arms/base"
    assert (packed / "seed-1/PACKED").exists() and not (packed / "seed-1/checkpoints").exists()
    assert not (packed / "seed-2/PACKED").exists() and (packed / "seed-2/train.json").exists()
    assert (packed / "seed-2/checkpoints/step-000001/model.safetensors").read_text() == "weights after step 1"
    (tmp_path / "calls.log").unlink()
    r = subprocess.run(["bash", script], env={**env, "EXP_DIR": str(tmp_path / "pk/exp")}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    trained = [c for c in calls(tmp_path) if c.startswith("train")]
    assert len(trained) == 1 and "seed-2" in trained[0]  # continued in its own folder, not moved aside
    assert not (tmp_path / "pk/exp/stale").exists()
    assert (packed / "seed-2/checkpoints/step-000001/model.safetensors").exists()
    assert any(c.startswith("eval") and "seed-2/checkpoints/step-000002 " in c for c in calls(tmp_path))


def test_score_every_scores_each_arm_at_those_steps_and_rl3d_train_checkpoints_them(tmp_path):
    """SCORE_EVERY=K: each arm is scored every K steps and at its last, recorded in experiment.json and
    read back by the summariser; rl3d train (ENGINE=train) saves a checkpoint at every step to score,
    also where an arm's EVAL_AT steps are not multiples of learning_run.sh's default."""
    from rl3d.stages.experiments.ablations import planned_steps, score_steps

    assert score_steps(50, 10) == [10, 20, 30, 40, 50] and score_steps(25, "10") == [10, 20, 25]
    assert score_steps(6, None) == score_steps(6, "") == [6]
    env = stub_env(tmp_path, EXP_DIR=str(tmp_path / "exp"), SEEDS="1", STEPS="3", ARMS="base",
                   BENCHES="synth-reasoning", ENGINE="train", SCORE_EVERY="2")
    subprocess.run(["bash", str(ROOT / "examples/ablations/algorithm.sh")], env=env, check=True, capture_output=True)
    c = calls(tmp_path)
    (train,) = [x for x in c if x.startswith("train")]
    assert "--save-every 1 " in train  # steps 2 and 3: only a checkpoint every step holds both
    scored = sorted(x.split("checkpoints/")[1].split()[0] for x in c if x.startswith("eval") and "seed-1" in x)
    assert scored == ["step-000002", "step-000003"]
    exp = load_experiment(tmp_path / "exp")
    assert exp.meta["settings"]["SCORE_EVERY"] == 2 and planned_steps(exp, "base") == [2, 3]

    scaling = stub_env(tmp_path, EXP_DIR=str(tmp_path / "scaling"), SEEDS="1", STEPS="2", ARMS="prompts-x1",
                       BENCHES="synth-reasoning", ENGINE="train")
    (tmp_path / "calls.log").unlink()
    subprocess.run(["bash", str(ROOT / "examples/ablations/scaling.sh")], env=scaling, check=True, capture_output=True)
    (train,) = [x for x in calls(tmp_path) if x.startswith("train")]
    assert "--steps 6 " in train and "--save-every 2 " in train  # EVAL_AT 2 4 6
