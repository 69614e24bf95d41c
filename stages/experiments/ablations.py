"""The ablations library: one experiment folder of examples/ablations/ -> tables, curves, a render grid.

An experiment folder (examples/ablations/common.sh writes it) holds experiment.json (the experiment,
the starting weights' hash and the settings every run shares), arms/ARM/seed-S/ (a learning run with
arm.json, metrics.parquet, wall.tsv and eval/step-N/BENCH/, an `rl3d eval` output) and
baseline/NAME/eval/step-000000/BENCH/ (the starting policy scored once per generation mode).

Numbers per arm: a metric's mean over seeds with a 95% t-interval over seeds (each seed's value is
the mean over its held-out samples), and the paired change from the arm's baseline per held-out
prompt (learning.paired_prompt_change: seeds pooled per prompt, bootstrap over prompts). Runs that do
not share the experiment, the starting weights or the held-out prompt set are refused (InputError).

Arm against arm: the findings an experiment script declares (experiment.json's "findings"), each
judged by findings.py. Learning curves: per arm the mean over seeds and the seed band of held-out
"all attributes right", spec accuracy and CLIP at every scored step, and the training KL."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from rl3d.formats import tables
from rl3d.formats.errors import InputError
from rl3d.stages.scoring.charts import band_sheet, line_sheet, render_grid
from rl3d.stages.scoring.learning import paired_prompt_change
from rl3d.stages.scoring.run_metrics import read_run_metrics

# per-sample columns of `rl3d eval` (per_sample.parquet) reported per benchmark; the first is the headline
# "mesh_decoded" (the sample's status is ok) comes last: the other metrics average over decoded
# samples only, so an arm that fails to decode half its meshes would otherwise look only mildly worse
BENCH_METRICS = {
    "synth-reasoning": ["spec_all_correct", "spec_accuracy", "clip_score", "reference_iou", "single_component_rate",
                        "mesh_decoded"],
    "text-reasoning": ["clip_score", "single_component_rate", "watertight_rate", "mesh_decoded"],
}
DEFAULT_METRICS = ["clip_score", "single_component_rate", "mesh_decoded"]
LABELS = {"spec_all_correct": "all attributes right", "spec_accuracy": "spec accuracy", "clip_score": "CLIP score",
          "reference_iou": "IoU vs truth", "single_component_rate": "single component",
          "watertight_rate": "watertight", "mesh_decoded": "mesh decoded"}
# the held-out panels of the learning-curves figure (synth-reasoning), before the training KL
HELDOUT_PANELS = {"spec_all_correct": "share of samples", "spec_accuracy": "share of spec checks passed",
                  "clip_score": "CLIP score (0-100)"}
# two-sided 95% Student t quantiles by degrees of freedom (seeds - 1)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass
class Evaluation:
    """One `rl3d eval` output: one policy on one benchmark."""
    arm: str
    seed: int | None            # None for a baseline
    step: int
    bench: str
    out: Path                   # the eval's --out
    policy_dir: Path            # its one policy's folder (per_sample.parquet, renders/)
    prompt_set: str             # the eval's prompts-<hash>.jsonl name
    policy_id: str
    rows: list[dict] = field(default_factory=list)
    start_weights: str = ""     # the weights the scored policy was trained from (a baseline's own)
    sampling_seed: int | None = None        # the eval's --seed, where its metrics table records it
    samples_per_prompt: int | None = None   # its --samples-per-prompt, likewise

    @property
    def label(self) -> str:
        return f"start ({self.arm})" if self.seed is None else f"{self.arm} seed {self.seed} step {self.step}"


@dataclass
class Experiment:
    path: Path
    meta: dict
    arms: dict[str, dict[int, Path]]            # arm -> seed -> run dir
    arm_meta: dict[str, dict]                   # arm -> its arm.json (of the first seed)
    evals: list[Evaluation]

    @property
    def folder(self) -> str:
        """The experiment folder's name, which names its summary files (attributes-6 beside attributes)."""
        return self.path.resolve().name


def weights_of(policy_id: str) -> str:
    """The weights hash of a policy id "<dir>@<hash>#step<N>"."""
    return policy_id.split("@")[-1].split("#")[0] if "@" in policy_id else ""


def load_experiment(exp_dir: Path) -> Experiment:
    exp_dir = Path(exp_dir)
    meta_file = exp_dir / "experiment.json"
    if not meta_file.exists():
        raise InputError(f"{exp_dir}: no experiment.json (not a folder of examples/ablations/)")
    meta = json.loads(meta_file.read_text())
    arms: dict[str, dict[int, Path]] = {}
    arm_meta: dict[str, dict] = {}
    starts: dict[Path, str] = {}
    for arm_file in sorted(exp_dir.glob("arms/*/seed-*/arm.json")):
        a = json.loads(arm_file.read_text())
        if a.get("experiment") != meta["experiment"]:
            raise InputError(f"{arm_file}: a run of experiment {a.get('experiment')!r}, not {meta['experiment']!r}; "
                             f"runs of different experiments are not summarised together")
        run = arm_file.parent
        starts[run] = _check_start(run, meta["start_weights"])
        arms.setdefault(a["arm"], {})[int(a["seed"])] = run
        arm_meta.setdefault(a["arm"], a)
    evals = [e for d in sorted(exp_dir.glob("baseline/*")) for e in _evaluations(d, d.name, None)]
    for b in evals:
        if weights_of(b.policy_id) != meta["start_weights"]:
            raise InputError(f"{b.out}: baseline policy {b.policy_id} is not the experiment's starting policy "
                             f"(weights {meta['start_weights']})")
        b.start_weights = weights_of(b.policy_id)
    evals += [e for arm, seeds in arms.items() for seed, run in seeds.items()
              for e in _evaluations(run, arm, seed, starts[run])]
    for bench in sorted({e.bench for e in evals}):
        on_bench = [e for e in evals if e.bench == bench]
        sets = sorted({e.prompt_set for e in on_bench})
        if len(sets) > 1:
            # the set most evaluations used is the experiment's; name an evaluation of another one
            usual = max(sets, key=lambda s: sum(e.prompt_set == s for e in on_bench))
            odd = next(e for e in on_bench if e.prompt_set != usual)
            raise InputError(f"{odd.out / (odd.prompt_set or 'prompts-*.jsonl')}: {odd.label} was scored on {bench} "
                             f"prompts {odd.prompt_set or '(none recorded)'}, the rest of {exp_dir} on {usual}; runs "
                             f"scored on different prompt sets are not compared")
    return Experiment(exp_dir, meta, arms, arm_meta, evals)


def _check_start(run: Path, start_weights: str) -> str:
    """The run's first step sampled from the experiment's starting weights: the policy its rewards
    (or, unpacked, its samples) table records. Returns those weights ("" for a run not started yet)."""
    tables_ = [run / "step-000001" / name for name in ("rewards", "gen") if (run / "step-000001" / name).exists()]
    if not tables_:
        return ""  # not started yet: nothing of it is summarised
    policy = tables.provenance(tables_[0]).policy or ""
    if weights_of(policy) != start_weights:
        raise InputError(f"{tables_[0]}: made from {policy or 'an unrecorded policy'}, not the experiment's starting "
                         f"weights {start_weights}; runs from different starting policies are not compared")
    return start_weights


def _evaluations(run: Path, arm: str, seed: int | None, start_weights: str = "") -> list[Evaluation]:
    out = []
    for bench_dir in sorted(run.glob("eval/step-*/*")):
        # eval names a policy's folder after the policy dir's base name (step-N/policy -> policy)
        per_sample = sorted(bench_dir.glob("*/per_sample.parquet"))
        if not (bench_dir / "report.md").exists() or not per_sample:
            continue  # unfinished: left out until its rerun completes it
        prompt_sets = sorted(p.name for p in bench_dir.glob("prompts-*.jsonl"))
        metrics = tables.read_table(bench_dir / "metrics", "metrics").to_pylist()
        config = tables.table_config(bench_dir / "metrics")  # the eval's options: its sampling seed
        out.append(Evaluation(arm, seed, int(bench_dir.parent.name.split("-")[1]), bench_dir.name, bench_dir,
                              per_sample[0].parent, prompt_sets[0] if prompt_sets else "",
                              metrics[0]["policy_id"] if metrics else "", pq.read_table(per_sample[0]).to_pylist(),
                              start_weights, config.get("seed"), config.get("samples_per_prompt")))
    return out


# ---------------------------------------------------------------- numbers

def sample_value(row: dict, metric: str) -> float | None:
    if metric == "mesh_decoded":
        return float(row.get("status") == "ok")
    v = row.get(metric)
    return None if v is None else float(v)


def eval_mean(ev: Evaluation, metric: str, category: str | None = None) -> float | None:
    vals = [sample_value(r, metric) for r in ev.rows if category in (None, r.get("category"))]
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def seed_interval(values: list[float]) -> dict:
    """Mean over seeds and the half-width of its 95% t-interval (None with one seed)."""
    v = np.array([x for x in values if x is not None], float)
    if len(v) == 0:
        return {"mean": None, "half": None, "seeds": 0}
    half = float(T95.get(len(v) - 1, 1.96) * v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "half": half, "seeds": int(len(v))}


def paired_change(base: Evaluation, arm_evals: list[Evaluation], metric: str) -> dict:
    """Change of a metric from the baseline to the arm, paired by held-out prompt (all seeds pooled)."""
    def as_rows(evs):
        return [{"prompt_id": r["prompt_id"], "level": "final", "total": sample_value(r, metric)}
                for e in evs for r in e.rows if sample_value(r, metric) is not None]
    return paired_prompt_change(as_rows([base]), as_rows(arm_evals), "final")


def arm_evals(exp: Experiment, arm: str, bench: str | None = None) -> list[Evaluation]:
    """The evaluations of an arm's runs (not of a starting policy that shares the arm's name)."""
    return [e for e in exp.evals if e.arm == arm and e.seed is not None and bench in (None, e.bench)]


def last_step(exp: Experiment, arm: str) -> int:
    steps = [e.step for e in arm_evals(exp, arm)]
    return max(steps) if steps else 0


def arm_rows(exp: Experiment, bench: str) -> list[dict]:
    """One row per (arm, evaluated step): the baseline, per metric the mean over seeds with its
    interval, and the paired change of every metric against the arm's baseline."""
    baselines = {e.arm: e for e in exp.evals if e.seed is None and e.bench == bench}
    metrics = BENCH_METRICS.get(bench, DEFAULT_METRICS)
    rows = []
    for name, e in sorted(baselines.items()):
        rows.append({"arm": f"start ({name})", "step": 0, "seeds": 1, "baseline": name,
                     **{m: {"mean": eval_mean(e, m), "half": None} for m in metrics}})
    for arm in exp.arms:
        base = baselines.get(exp.arm_meta[arm].get("baseline", ""))
        for step in sorted({e.step for e in arm_evals(exp, arm, bench)}):
            evs = [e for e in arm_evals(exp, arm, bench) if e.step == step]
            row = {"arm": arm, "step": step, "seeds": len(evs), "baseline": base.arm if base else ""}
            for m in metrics:
                row[m] = seed_interval([eval_mean(e, m) for e in evs])
                row[m]["paired"] = paired_change(base, evs, m) if base else {"prompts": 0}
            rows.append(row)
    return rows


def category_rows(exp: Experiment, bench: str, metric: str) -> tuple[list[str], list[dict]]:
    """Per arm (last evaluated step) and baseline: the metric per category, mean over seeds."""
    cats = sorted({r["category"] for e in exp.evals if e.bench == bench for r in e.rows})
    rows = []
    groups = [(f"start ({e.arm})", [e]) for e in exp.evals if e.seed is None and e.bench == bench]
    groups += [(arm, [e for e in arm_evals(exp, arm, bench) if e.step == last_step(exp, arm)]) for arm in exp.arms]
    for label, evs in groups:
        if evs:
            rows.append({"arm": label, **{c: seed_interval([eval_mean(e, metric, c) for e in evs]) for c in cats}})
    return cats, rows


def scored_seeds(exp: Experiment, arm: str) -> list[int]:
    """Seeds of the arm with at least one finished held-out evaluation."""
    return sorted({e.seed for e in exp.evals if e.arm == arm and e.seed is not None})


def score_steps(steps: int, every=None) -> list[int]:
    """The steps a run of `steps` steps is scored at without an EVAL_AT knob: every `every` steps
    (the experiment's SCORE_EVERY; None or empty: none) and the last."""
    every = int(every) if every else 0
    return sorted(set(range(every, steps, every)) | {steps}) if every > 0 else [steps]


def planned_steps(exp: Experiment, arm: str) -> list[int]:
    """The steps the arm's runs are scored at: the arm's EVAL_AT, else score_steps of its STEPS (else
    the experiment's) and the experiment's SCORE_EVERY."""
    knobs = exp.arm_meta[arm].get("knobs") or {}
    if knobs.get("EVAL_AT"):
        return [int(n) for n in str(knobs["EVAL_AT"]).split()]
    settings = exp.meta["settings"]
    return score_steps(int(knobs.get("STEPS") or settings["STEPS"]), settings.get("SCORE_EVERY"))


def planned_benches(exp: Experiment) -> list[str]:
    """The benchmarks every run is scored on: the experiment's BENCHES, else those any run was scored on."""
    benches = str(exp.meta["settings"].get("BENCHES") or "").split()
    return benches or sorted({e.bench for e in exp.evals})


def unscored_runs(exp: Experiment) -> list[tuple[str, int, list[str], int]]:
    """(arm, seed, what is left to score, last finished training step) of every run not scored at all
    its planned steps on all the experiment's benchmarks: an experiment stopped by its time budget,
    or a packed run waiting to be trained again. What is left is a step ("6") where no benchmark was
    scored, else the step and the benchmarks left ("6 text-reasoning")."""
    out = []
    benches = planned_benches(exp)
    for arm, seeds in exp.arms.items():
        for seed, run in sorted(seeds.items()):
            scored = {(e.step, e.bench) for e in exp.evals if e.arm == arm and e.seed == seed}
            missing = []
            for n in planned_steps(exp, arm):
                left = [b for b in benches if (n, b) not in scored]
                if left:
                    missing.append(str(n) if len(left) == len(benches) else f"{n} {' '.join(left)}")
            if missing:
                # a step that sampled (gen) or kept its scores (rewards, in a packed run)
                steps = [int(d.name.split("-")[1]) for d in run.glob("step-*")
                         if (d / "rewards").is_dir() or (d / "gen").is_dir()]
                out.append((arm, seed, missing, max(steps, default=0)))
    return out


def wall_times(exp: Experiment) -> list[dict]:
    """Seconds of training and of held-out scoring per arm (all seeds and slices), and the cards."""
    out = []
    for arm, seeds in exp.arms.items():
        train = score = 0.0
        cards = set()
        for run in seeds.values():
            for f in [run / "wall.tsv", *run.glob("eval/step-*/wall.tsv")]:
                for row, line in enumerate(f.read_text().splitlines() if f.exists() else [], 1):
                    try:
                        kind, sec, card = line.split("\t")
                        sec = float(sec)
                    except ValueError:
                        raise InputError(f"{f}: row {row}: expected KIND<tab>SECONDS<tab>CARD, got {line!r}") from None
                    train, score = (train + sec, score) if kind == "train" else (train, score + sec)
                    cards.add(card)
        out.append({"arm": arm, "runs": len(seeds), "train_s": train, "eval_s": score, "cards": sorted(cards)})
    return out


# ---------------------------------------------------------------- images

def plot_curves(exp: Experiment, out: Path) -> Path:
    """Training curves per arm, mean over seeds: batch reward of the final level, KL, entropy."""
    panels = {"reward": {}, "kl": {}, "entropy": {}}
    for arm, seeds in exp.arms.items():
        per_seed = [read_run_metrics(run / "metrics.parquet") for run in seeds.values()
                    if (run / "metrics.parquet").exists()]
        if not per_seed:
            continue
        level = "single" if "reward_mean_single" in per_seed[0] else "fine"
        for panel, name in (("reward", f"reward_mean_{level}"), ("kl", "kl"), ("entropy", "entropy")):
            curve = _mean_curve([m[name] for m in per_seed if name in m])
            if curve:
                panels[panel][arm] = curve
    titles = {"reward": "training batch reward, final level (mean over seeds)",
              "kl": "KL to the starting policy (k3, mean over seeds)", "entropy": "entropy, nats/token"}
    return line_sheet([(titles[k], v) for k, v in panels.items()], out)


def seed_band(values_by_step: dict[int, list[float]]) -> dict:
    """Per step with values: the mean over seeds, the lowest and highest seed, and how many seeds."""
    steps = sorted(s for s, v in values_by_step.items() if v)
    v = [values_by_step[s] for s in steps]
    return {"steps": steps, "mean": [float(np.mean(x)) for x in v], "low": [float(min(x)) for x in v],
            "high": [float(max(x)) for x in v], "seeds": [len(x) for x in v]}


def heldout_curves(exp: Experiment, bench: str = "synth-reasoning") -> list[dict]:
    """The learning-curves figure's data, one panel per metric: the held-out metrics of HELDOUT_PANELS
    on `bench` at every step a checkpoint was scored, then the KL to the starting policy of the
    runs' metrics.parquet at every training step. Per arm a seed_band; step 0 is the starting policy
    (the arm's baseline evaluation; a KL of 0, its distance to itself)."""
    panels = []
    for metric, ylabel in HELDOUT_PANELS.items():
        series = {}
        for arm in exp.arms:
            by_step: dict[int, list[float]] = {}
            base = next((e for e in exp.evals if e.seed is None and e.bench == bench
                         and e.arm == exp.arm_meta[arm].get("baseline")), None)
            for e in ([base] if base else []) + arm_evals(exp, arm, bench):
                v = eval_mean(e, metric)
                if v is not None:
                    by_step.setdefault(e.step, []).append(v)
            if any(s > 0 for s in by_step):  # an arm with no scored checkpoint has no curve yet
                series[arm] = seed_band(by_step)
        panels.append({"metric": metric, "bench": bench, "ylabel": ylabel,
                       "title": f"{LABELS[metric]}, held-out {bench}", "series": series})
    series, no_kl = {}, []
    for arm, seeds in exp.arms.items():
        by_step = {0: []}
        for run in seeds.values():
            if (run / "metrics.parquet").exists():
                steps, values = read_run_metrics(run / "metrics.parquet").get("kl", ([], []))
                by_step[0] += [0.0] if steps else []
                for step, v in zip(steps, values):
                    by_step.setdefault(int(step), []).append(v)
        if len(by_step) > 1:
            series[arm] = seed_band(by_step)
        else:
            no_kl.append(arm)  # an arm without a KL term (beta 0) records none
    panels.append({"metric": "kl", "bench": "training", "ylabel": "KL per token (k3)", "series": series,
                   "title": "KL to the starting policy, training batches" +
                            (f" (none recorded: {', '.join(no_kl)})" if no_kl else "")})
    return panels


def plot_heldout(exp: Experiment, out: Path, panels: list[dict] | None = None) -> Path:
    """One figure of the experiment's learning curves (`panels`, default heldout_curves): a panel per
    metric, per arm the mean over seeds and a band from the lowest to the highest seed."""
    panels = [(p["title"], p["ylabel"], {arm: (c["steps"], c["mean"], c["low"], c["high"])
                                         for arm, c in p["series"].items()})
              for p in (heldout_curves(exp) if panels is None else panels)]
    title = (f"{exp.folder}: learning curves. Line: mean over seeds; band: lowest to highest seed; "
             f"step 0: the starting policy")
    return band_sheet(panels, out, title)


def _mean_curve(curves: list[tuple[list[float], list[float]]]):
    by_step: dict[float, list[float]] = {}
    for steps, values in curves:
        for s, v in zip(steps, values):
            by_step.setdefault(s, []).append(v)
    steps = sorted(by_step)
    return (steps, [float(np.mean(by_step[s])) for s in steps]) if steps else None


def render_sheet(exp: Experiment, out: Path, bench: str = "synth-reasoning", n_prompts: int = 6) -> Path | None:
    """Before/after: rows = held-out prompts (one per category), columns = each starting policy and
    each arm's last step (first seed), sample 0, up to 2 views."""
    columns = [(f"start ({e.arm})", e) for e in exp.evals if e.seed is None and e.bench == bench]
    for arm, seeds in exp.arms.items():
        evs = [e for e in arm_evals(exp, arm, bench) if e.seed == min(seeds) and e.step == last_step(exp, arm)]
        columns += [(f"{arm} (step {evs[0].step})", evs[0])] if evs else []
    if not columns:
        return None
    first = columns[0][1]
    by_cat: dict[str, dict] = {}
    for r in first.rows:
        by_cat.setdefault(r["category"], r)
    grid = []
    for r in list(by_cat.values())[:n_prompts]:
        views = {label: _views(ev, r["prompt_id"]) for label, ev in columns}
        grid.append({"category": r["category"], "prompt": _prompt(first, r["prompt_id"]), "policies": views})
    return render_grid(grid, [label for label, _ in columns], out, views=2)


def _views(ev: Evaluation, prompt_id: str) -> list[str]:
    ids = sorted(r["sample_id"] for r in ev.rows if r["prompt_id"] == prompt_id)
    if not ids:
        return []
    renders = tables.read_table(ev.policy_dir / "renders", "renders").to_pylist()
    # a packed experiment (examples/ablations/pack.sh) keeps sample 0's images only, and before
    # it kept all views only its first two: show the views that are there
    return [str(r["image_path"]) for r in sorted(renders, key=lambda r: r["view"])
            if r["sample_id"] == ids[0] and r["status"] == "ok" and Path(r["image_path"]).exists()]


def _prompt(ev: Evaluation, prompt_id: str) -> str:
    for f in ev.out.glob("prompts-*.jsonl"):
        for line in f.read_text().splitlines():
            p = json.loads(line)
            if p.get("prompt_id") == prompt_id:
                return p.get("prompt", prompt_id)
    return prompt_id


# ---------------------------------------------------------------- markdown

def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def cell(v: dict, digits: int = 3) -> str:
    if v.get("mean") is None:
        return "-"
    return fmt(v["mean"], digits) + (f" ± {v['half']:.{digits}f}" if v.get("half") is not None else "")


def paired_cell(p: dict, digits: int = 3) -> str:
    if not p.get("prompts"):
        return "-"
    return (f"{p['change']:+.{digits}f} [{p['ci_low']:+.{digits}f}, {p['ci_high']:+.{digits}f}] "
            f"({p['improved']}/{p['prompts']} up)")


def experiment_commands(exp: Experiment) -> list[str]:
    """The command that reruns the experiment (sizes as run), and what each arm sets."""
    env = {**exp.meta["settings"], **exp.meta.get("command_env", {})}
    env["EXP_DIR"] = str(exp.path)
    words = " ".join(f"{k}={v}" if " " not in str(v) and str(v) else f'{k}="{v}"' for k, v in env.items())
    lines = [f"{words} bash examples/ablations/{exp.meta['experiment']}.sh"]
    for arm, a in exp.arm_meta.items():
        knobs = " ".join(f"{k}={v}" for k, v in a.get("knobs", {}).items()) or "(the base recipe)"
        lines.append(f"arm {arm}: {knobs}")
    return lines


# ---------------------------------------------------------------- where the learning signal is

def group_spread(rows: list[dict]) -> dict[str, dict]:
    """Per level, how much a (prompt, level) group of samples disagrees, which is all GRPO learns from:
    the mean within-group std of the total and of each term (in reward units), the share of groups
    whose samples differ in "all spec checks passed" (some right, some not: the only groups that
    teach getting everything right) and the shares where every sample is right or every one wrong,
    and per spec attribute kind (color, params, ...) the share of (group, check) pairs that differ
    between samples, and that every sample fails (a consistent mistake: no signal to fix it)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("total") is not None:
            groups.setdefault((r["level"], r["prompt_id"]), []).append(r)
    terms = sorted({k for r in rows for k, v in r.items() if isinstance(v, float) and k != "total"
                    and not k.endswith("_raw")})
    out: dict[str, dict] = {}
    for level in sorted({lv for lv, _ in groups}):
        gs = [g for (lv, _), g in groups.items() if lv == level and len(g) > 1]
        stats: dict = {"groups": len(gs), "samples_per_group": float(np.mean([len(g) for g in gs])) if gs else 0.0,
                       "std_total": _mean_std(gs, "total")}
        for t in terms:
            s = _mean_std(gs, t)
            if s is not None:
                stats[f"std_{t}"] = s
        specs = [[r.get("spec_raw") for r in g] for g in gs if all(r.get("spec_raw") is not None for r in g)]
        if specs:
            right = [[v >= 1.0 - 1e-9 for v in g] for g in specs]
            stats["all_right_rate"] = float(np.mean([x for g in right for x in g]))
            stats["groups_all_right_mixed"] = float(np.mean([0 < sum(g) < len(g) for g in right]))
            stats["groups_all_right_every"] = float(np.mean([all(g) for g in right]))
            stats["groups_all_right_none"] = float(np.mean([not any(g) for g in right]))
        for kind, (mixed, failed, n) in _check_agreement(gs).items():
            stats[f"checks_{kind}_mixed"] = mixed / n
            stats[f"checks_{kind}_all_fail"] = failed / n
        out[level] = stats
    return out


def _mean_std(groups: list[list[dict]], key: str) -> float | None:
    stds = [float(np.std([r[key] for r in g])) for g in groups if all(isinstance(r.get(key), float) for r in g)]
    return float(np.mean(stds)) if stds else None


def _check_agreement(groups: list[list[dict]]) -> dict[str, tuple[int, int, int]]:
    """attribute kind -> (checks mixed within a group, checks every sample failed, checks), over groups."""
    out: dict[str, list[int]] = {}
    for g in groups:
        per_check: dict[str, list[bool]] = {}
        for r in g:
            details = json.loads(r.get("spec_details") or "{}")
            for c in details.get("checks", []):
                per_check.setdefault(c["attribute"], []).append(bool(c["passed"]))
        for attr, passed in per_check.items():
            if len(passed) != len(g):
                continue  # a sample without this check (undecodable): not comparable
            acc = out.setdefault(attr.split(".")[0], [0, 0, 0])
            acc[0] += 0 < sum(passed) < len(passed)
            acc[1] += not any(passed)
            acc[2] += 1
    return {k: (m, f, n) for k, (m, f, n) in sorted(out.items()) if n}


def nucleus_frozen(samples: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (level, span): the share of sampled tokens whose probability under the sampling
    distribution was at least the nucleus mass top_p. At such a position top-p sampling keeps one
    token, so every sample of a group takes the same one: no exploration there, and no reward spread
    to learn from. Span = reasoning or mesh; forced tokens (log-prob 0) count as frozen."""
    acc: dict[tuple[str, str], list[float]] = {}
    for r in samples:
        lp = np.asarray(r["logprobs"], float)
        start = r["prompt_len"]
        spans = {"reasoning": (r["reasoning_start"], r["reasoning_end"]), "mesh": (r["mesh_start"], r["mesh_end"])}
        for span, (a, b) in spans.items():
            x = lp[max(a - start, 0):max(b - start, 0)]
            if len(x):
                top_p = r.get("top_p") or 1.0
                acc.setdefault((r["level"], span), []).extend([
                    float(np.sum(x >= np.log(top_p) - 1e-12)), float(len(x)), float(np.sum(-x))])
    out = {}
    for key, v in sorted(acc.items()):
        frozen, n, nll = (sum(v[i::3]) for i in range(3))
        out[key] = {"tokens": int(n), "frozen": frozen / n, "entropy_estimate": nll / n}
    return out
