"""The paper's findings, arm against arm: which of them one experiment of examples/ablations/ reproduces.

An experiment script declares the findings it tests beside its arms (common.sh's `finding`, recorded
in experiment.json's "findings"): a claim, side A, '>' or '<', side B, and the held-out metrics it is
judged on ("spec_all_correct", or "text-reasoning:clip_score" for another benchmark than
synth-reasoning). A side is an arm ("hi-grpo") or an arm at a training step ("prompts-x1@20").

Comparison of side A with side B on one benchmark's metric at one training step (a side without a
step takes the other side's, else the last step both sides were scored at):
- paired by held-out prompt: a side's value of a prompt is the mean over its seeds of that seed's
  mean over the prompt's samples; the difference is the mean over prompts of A - B, with a 95%
  bootstrap interval over prompts (learning.paired_prompt_change). Both sides must have been scored
  on one prompt set, with the same samples of every prompt under one sampling seed, by policies
  trained from one starting policy: anything else is refused (InputError naming the file).
- seed-level: the difference of the two sides' means over seeds (a seed's value is its mean over all
  its held-out samples), with a 95% Welch t-interval. The paired interval holds each trained policy
  fixed; this one sees how far one training seed lands from the next. (One arm at two steps is the
  same runs twice; Welch's interval ignores that pairing, so it is the wider one.)

Verdict, from the paired interval and the claim's direction:
- reproduced: the interval excludes 0 on the claimed side; reversed: on the other side;
- not reproduced: it includes 0 and lies inside +-MIN_EFFECT, so the arms differ by less than the
  smallest difference worth claiming;
- not separated: it includes 0 and reaches past +-MIN_EFFECT; then a power estimate says how many
  seeds or prompts would separate the arms.

Power estimate, for an effect E = max(|d|, MIN_EFFECT[metric]), d the paired difference (a difference
below the minimum effect is estimated against the minimum: separating a difference of ~0 needs
infinitely many runs and answers nothing):
- prompts (at the current seeds): the smallest P with 1.96 * s_p / sqrt(P) < E, i.e.
  P = floor((1.96 * s_p / E)^2) + 1, s_p the standard deviation (ddof 1) of the per-prompt
  differences. 1.96 * s_p / sqrt(P) is the half-width of the normal interval of a mean over P
  prompts, which the percentile bootstrap approximates.
- seeds per arm (at the current prompts): the smallest n >= 2 with
  t(0.975, nu) * sqrt((v_a + v_b) / n) < E, v_a and v_b the between-seed variances (ddof 1) of each
  side's seed means, nu = (n - 1) (v_a + v_b)^2 / (v_a^2 + v_b^2) (Welch's degrees of freedom with n
  seeds a side). Unknown with fewer than 2 seeds on a side.
An interval that includes 0 at the current size needs more than that size: the estimate is at least
one prompt (seed) more than there are."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from rl3d.formats.errors import InputError
from rl3d.stages.experiments.ablations import (BENCH_METRICS, DEFAULT_METRICS, LABELS, Evaluation, Experiment,
                                               arm_evals, eval_mean, sample_value)
from rl3d.stages.scoring.learning import paired_prompt_change, prompt_means

DEFAULT_BENCH = "synth-reasoning"
# the smallest difference worth claiming: 5 points of a rate, 1 CLIP point (the paper's steps are
# 1.2 to 2.8 points of CLIP score on its 0-100 scale)
MIN_EFFECT = {"clip_score": 1.0}
MIN_EFFECT_RATE = 0.05
Z95 = 1.959963984540054
MOST = 1_000_000  # a bound for the searches: past it, "more than a million" is the answer


def min_effect(metric: str) -> float:
    return MIN_EFFECT.get(metric, MIN_EFFECT_RATE)


# ---------------------------------------------------------------- the statistics (pure)

def welch_interval(a: list[float], b: list[float]) -> dict:
    """mean(a) - mean(b) with its 95% Welch t-interval (half None with fewer than 2 values a side)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    out = {"change": float(a.mean() - b.mean()), "half": None, "df": None}
    if len(a) < 2 or len(b) < 2:
        return out
    ua, ub = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if ua + ub == 0:
        return {**out, "half": 0.0}
    df = (ua + ub) ** 2 / (ua ** 2 / (len(a) - 1) + ub ** 2 / (len(b) - 1))
    return {**out, "half": float(stats.t.ppf(0.975, df) * math.sqrt(ua + ub)), "df": float(df)}


def prompts_needed(prompt_sd: float, effect: float) -> int:
    """The smallest number of prompts P with 1.96 * prompt_sd / sqrt(P) < effect."""
    if prompt_sd == 0:
        return 1
    return min(MOST, math.floor((Z95 * prompt_sd / effect) ** 2) + 1)


def seeds_needed(var_a: float, var_b: float, effect: float) -> int:
    """The smallest number of seeds n >= 2 a side with t(0.975, nu(n)) * sqrt((var_a + var_b) / n)
    < effect, nu(n) = (n - 1) (var_a + var_b)^2 / (var_a^2 + var_b^2) (Welch, n seeds a side)."""
    total = var_a + var_b
    if total == 0:
        return 2
    share = total ** 2 / (var_a ** 2 + var_b ** 2)  # nu / (n - 1): between 1 and 2
    # t > 1.96, so no n below the normal answer qualifies: start there, then step up
    n = max(2, math.floor(Z95 ** 2 * total / effect ** 2))
    while n < MOST and stats.t.ppf(0.975, (n - 1) * share) * math.sqrt(total / n) >= effect:
        n += 1
    return n


def verdict(op: str, low: float, high: float, metric: str) -> str:
    """reproduced / reversed / not reproduced / not separated (see the module's docstring)."""
    sign = 1 if op == ">" else -1
    if sign * low > 0 and sign * high > 0:
        return "reproduced"
    if sign * low < 0 and sign * high < 0:
        return "reversed"
    m = min_effect(metric)
    return "not reproduced" if -m < low and high < m else "not separated"


# ---------------------------------------------------------------- declarations

@dataclass(frozen=True)
class Side:
    arm: str
    step: int | None        # None: as the other side, else the last step both were scored at

    def __str__(self) -> str:
        return self.arm if self.step is None else f"{self.arm}@{self.step}"


@dataclass(frozen=True)
class Finding:
    claim: str
    a: Side
    op: str                 # ">": A's metric is higher than B's; "<": lower
    b: Side
    metrics: tuple[tuple[str, str], ...]     # (benchmark, metric)


def parse_side(text: str, where: str) -> Side:
    arm, at, step = str(text).partition("@")
    if not arm or (at and not step.isdigit()):
        raise InputError(f"{where}: side {text!r}: expected ARM or ARM@STEP (a training step)")
    return Side(arm, int(step) if at else None)


def parse_metric(text: str, where: str) -> tuple[str, str]:
    bench, _, metric = str(text).rpartition(":")
    bench = bench or DEFAULT_BENCH
    known = BENCH_METRICS.get(bench, DEFAULT_METRICS)
    if metric not in known:
        raise InputError(f"{where}: metric {text!r}: {bench} reports {', '.join(known)}")
    return bench, metric


def declared_findings(exp: Experiment) -> list[Finding]:
    """The findings experiment.json declares, checked."""
    out = []
    for i, f in enumerate(exp.meta.get("findings") or [], 1):
        where = f"{exp.path / 'experiment.json'}: finding {i}"
        fields = ("claim", "arm", "op", "other")
        if not isinstance(f, dict) or not all(isinstance(f.get(k), str) and f[k] for k in fields):
            raise InputError(f"{where}: expected claim, arm, op, other and metrics (common.sh's finding writes them)")
        if f["op"] not in (">", "<"):
            raise InputError(f"{where} ({f['claim']!r}): op {f['op']!r}: expected '>' or '<'")
        metrics = f.get("metrics")
        if not isinstance(metrics, list) or not metrics:
            raise InputError(f"{where} ({f['claim']!r}): no metrics to judge it on")
        out.append(Finding(f["claim"], parse_side(f["arm"], where), f["op"], parse_side(f["other"], where),
                           tuple(parse_metric(m, where) for m in metrics)))
    return out


# ---------------------------------------------------------------- arm against arm

def check_paired(evals: list[Evaluation]) -> None:
    """Evaluations compared prompt by prompt: one prompt set, the same samples of every prompt under
    one sampling seed, policies trained from one starting policy. Refused naming the file of an
    evaluation that differs from what most of them share."""
    def odd_one(value):
        """(an evaluation whose value differs from the most common one, one with that) or (None, None);
        evaluations that do not record the value (None, "") are left out."""
        known = [(e, v) for e in evals if (v := value(e)) not in (None, "")]
        values = [v for _, v in known]
        usual = max(values, key=values.count, default=None)
        odd = next((e for e, v in known if v != usual), None)
        return (odd, next(e for e, v in known if v == usual)) if odd else (None, None)

    e, ref = odd_one(lambda e: e.prompt_set or "(none recorded)")
    if e:
        raise InputError(f"{e.out / (e.prompt_set or 'prompts-*.jsonl')}: {e.label} was scored on {e.bench} prompts "
                         f"{e.prompt_set or '(none recorded)'}, {ref.label} on {ref.prompt_set}; arms scored on "
                         f"different prompt sets are not compared")
    for what, attr in (("sampling seed", "sampling_seed"), ("samples per prompt", "samples_per_prompt")):
        e, ref = odd_one(lambda e: getattr(e, attr))
        if e:
            raise InputError(f"{e.out / 'metrics'}: {e.label} was scored with {what} {getattr(e, attr)}, "
                             f"{ref.label} with {getattr(ref, attr)}; its samples do not pair with the other arm's")
    e, ref = odd_one(lambda e: e.start_weights)
    if e:
        raise InputError(f"{e.out.parents[2] / 'arm.json'}: {e.label} was trained from weights {e.start_weights}, "
                         f"{ref.label} from {ref.start_weights}; arms from different starting policies are not "
                         f"compared")
    e, ref = odd_one(lambda e: frozenset(sample_keys(e)))
    if e:
        diff = sorted(sample_keys(e) ^ sample_keys(ref))
        raise InputError(f"{e.policy_dir / 'per_sample.parquet'}: {e.label} scored other samples than {ref.label} "
                         f"({len(diff)} (prompt, sample) pairs in one only, e.g. {diff[0][0]} sample {diff[0][1]}); "
                         f"its samples do not pair with the other arm's")


def sample_keys(e: Evaluation) -> set[tuple[str, str]]:
    """(prompt id, sample index) of every scored sample; the index is the middle of the sample id
    "<prompt_id>-<k>-<level>" (levels differ between modes, the index does not)."""
    return {(r["prompt_id"], r["sample_id"][len(r["prompt_id"]) + 1:].split("-")[0]) for r in e.rows}


def seed_prompt_rows(evals: list[Evaluation], metric: str) -> list[dict]:
    """One row per (seed, prompt): the seed's mean over the prompt's samples, as prompt_means reads
    them, so that a prompt's value over these rows is its mean over seeds."""
    out = []
    for e in evals:
        rows = [{"prompt_id": r["prompt_id"], "level": "final", "total": v} for r in e.rows
                if (v := sample_value(r, metric)) is not None and math.isfinite(v)]
        out += [{"prompt_id": p, "level": "final", "total": m} for p, m in prompt_means(rows, "final").items()]
    return out


def scored_steps(exp: Experiment, arm: str, bench: str) -> set[int]:
    return {e.step for e in arm_evals(exp, arm, bench)}


def resolve_steps(exp: Experiment, a: Side, b: Side, bench: str) -> tuple[int | None, int | None]:
    """The steps compared: a side's own, else the other side's, else the last step both were scored at."""
    if a.step is not None or b.step is not None:
        return (a.step if a.step is not None else b.step), (b.step if b.step is not None else a.step)
    common = scored_steps(exp, a.arm, bench) & scored_steps(exp, b.arm, bench)
    return (max(common), max(common)) if common else (None, None)


def compare(exp: Experiment, a: Side, b: Side, bench: str, metric: str) -> dict:
    """Side A against side B on one benchmark's metric (see the module's docstring). A side not scored
    there yet gives {"status": "not scored", "missing": [...]}."""
    step_a, step_b = resolve_steps(exp, a, b, bench)
    out = {"arm": a.arm, "other": b.arm, "step": step_a, "other_step": step_b, "bench": bench, "metric": metric}
    ev_a = [e for e in arm_evals(exp, a.arm, bench) if e.step == step_a]
    ev_b = [e for e in arm_evals(exp, b.arm, bench) if e.step == step_b]
    missing = [str(s) for s, evs in ((a, ev_a), (b, ev_b)) if not evs]
    if missing:
        return {**out, "status": "not scored", "missing": missing}
    check_paired(ev_a + ev_b)
    rows_a, rows_b = seed_prompt_rows(ev_a, metric), seed_prompt_rows(ev_b, metric)
    pa, pb = prompt_means(rows_a, "final"), prompt_means(rows_b, "final")
    diffs = np.array([pa[p] - pb[p] for p in sorted(set(pa) & set(pb))])
    if len(diffs) == 0:
        return {**out, "status": "no values", "missing": []}
    paired = paired_prompt_change(rows_b, rows_a, "final")  # B -> A: the change is A - B
    seeds_a = [v for e in ev_a if (v := eval_mean(e, metric)) is not None]
    seeds_b = [v for e in ev_b if (v := eval_mean(e, metric)) is not None]
    seed = welch_interval(seeds_a, seeds_b)
    return {**out, "status": "compared", "prompts": paired["prompts"],
            "seeds": len(seeds_a), "other_seeds": len(seeds_b),
            "change": paired["change"], "ci_low": paired["ci_low"], "ci_high": paired["ci_high"],
            "improved": paired["improved"], "prompt_sd": float(diffs.std(ddof=1)) if len(diffs) > 1 else None,
            "seed_change": seed["change"], "seed_half": seed["half"], "seed_df": seed["df"],
            "seed_var": float(np.var(seeds_a, ddof=1)) if len(seeds_a) > 1 else None,
            "other_seed_var": float(np.var(seeds_b, ddof=1)) if len(seeds_b) > 1 else None}


def power(c: dict) -> dict:
    """The seeds a side and prompts that would make the intervals of a comparison narrower than its
    effect (the module's docstring): {"effect", "at_minimum", "seeds", "prompts"}, None where unknown."""
    m = min_effect(c["metric"])
    effect = max(abs(c["change"]), m)
    prompts = seeds = None
    if c["prompt_sd"] is not None:
        prompts = prompts_needed(c["prompt_sd"], effect)
        if c["ci_low"] <= 0 <= c["ci_high"]:
            prompts = max(prompts, c["prompts"] + 1)
    if c["seed_var"] is not None and c["other_seed_var"] is not None:
        seeds = seeds_needed(c["seed_var"], c["other_seed_var"], effect)
        if seed_includes_zero(c):
            seeds = max(seeds, max(c["seeds"], c["other_seeds"]) + 1)
    return {"effect": effect, "at_minimum": abs(c["change"]) < m, "seeds": seeds, "prompts": prompts}


def seed_includes_zero(c: dict) -> bool:
    return c["seed_half"] is None or abs(c["seed_change"]) <= c["seed_half"]


def finding_rows(exp: Experiment) -> list[dict]:
    """One row per declared finding and metric: the comparison, its verdict and, where the arms are
    not separated (by prompts, or by seeds), the power estimate."""
    rows = []
    for f in declared_findings(exp):
        for bench, metric in f.metrics:
            c = compare(exp, f.a, f.b, bench, metric)
            row = {"claim": f.claim, "op": f.op, "side": str(f.a), "other_side": str(f.b), **c}
            if c["status"] == "compared":
                row["verdict"] = verdict(f.op, c["ci_low"], c["ci_high"], metric)
                row["seed_separated"] = not seed_includes_zero(c)
                if row["verdict"] == "not separated" or not row["seed_separated"]:
                    row["power"] = power(c)
            else:
                row["verdict"] = "not scored yet" if c["status"] == "not scored" else "no values"
            rows.append(row)
    return rows


# ---------------------------------------------------------------- markdown

def count(n: int | None) -> str:
    return "?" if n is None else "more than 1,000,000" if n >= MOST else f"{n:,}"


def verdict_cell(r: dict) -> str:
    if r["status"] != "compared":
        return (f"not scored yet ({', '.join(r['missing'])})" if r["status"] == "not scored"
                else "no values (no sample scored on this metric)")
    text = f"**{r['verdict']}**"
    p = r.get("power")
    if r["verdict"] == "not reproduced":
        return text + f": interval inside ±{min_effect(r['metric']):g}"
    if not p:
        return text
    effect = f" (to separate {p['effect']:.3g}" + (", the minimum effect" if p["at_minimum"] else "") + ")"
    seeds = f"~{count(p['seeds'])} seeds" if p["seeds"] is not None else None
    if r["verdict"] == "not separated":
        needs = " or ".join(x for x in (seeds, f"~{count(p['prompts'])} prompts" if p["prompts"] else None) if x)
        text += f": needs {needs}{effect}" if needs else ""
        return text + ("" if seeds else "; one seed an arm: the seed spread is not measured")
    # reproduced or reversed by the prompts, while the training seeds scatter across 0
    return text + (f"; the seed-level interval includes 0: {seeds}{effect}" if seeds
                   else "; one seed an arm: the seed spread is not measured")


def step_cell(r: dict) -> str:
    if r["step"] is None:
        return "-"
    return str(r["step"]) if r["step"] == r["other_step"] else f"{r['step']} vs {r['other_step']}"


def finding_table(rows: list[dict]) -> list[str]:
    """The Findings table's Markdown lines (none without declared findings)."""
    if not rows:
        return []
    lines = ["| finding | arms | metric | step | paired difference [95%] | seed-level [95%] | seeds x prompts "
             "| verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        metric = LABELS.get(r["metric"], r["metric"]) + ("" if r["bench"] == DEFAULT_BENCH else f" ({r['bench']})")
        arms = f"{r['side']} {r['op']} {r['other_side']}"
        if r["status"] == "compared":
            d = 2 if r["metric"] == "clip_score" else 3
            paired = f"{r['change']:+.{d}f} [{r['ci_low']:+.{d}f}, {r['ci_high']:+.{d}f}]"
            seed = (f"{r['seed_change']:+.{d}f} ± {r['seed_half']:.{d}f}" if r["seed_half"] is not None
                    else f"{r['seed_change']:+.{d}f} (one seed)")
            seeds = str(r["seeds"]) if r["seeds"] == r["other_seeds"] else f"{r['seeds']}/{r['other_seeds']}"
            size = f"{seeds} x {r['prompts']}"
        else:
            paired = seed = size = "-"
        lines.append(f"| {r['claim']} | {arms} | {metric} | {step_cell(r)} | {paired} | {seed} | {size} | "
                     f"{verdict_cell(r)} |")
    return lines


METHOD = ("Findings: each finding examples/ablations/{script}.sh declares, judged at the last step both arms "
          "were scored at (or the steps it names). `paired difference`: first arm minus second per held-out "
          "prompt (an arm's prompt value is its mean over seeds), 95% bootstrap interval over prompts; "
          "`seed-level`: difference of the arms' means over seeds ± the 95% Welch t-interval. Verdict from the "
          "paired interval: **reproduced** (excludes 0 in the claimed direction), **reversed** (excludes 0 the "
          "other way), **not reproduced** (includes 0 and lies inside ± the minimum effect: 0.05 for rates, "
          "1 CLIP point), **not separated** (includes 0, wider than that), with the seeds per arm (at these "
          "prompts) or prompts (at these seeds) that would make a 95% interval narrower than the difference "
          "seen, or than the minimum effect when the difference is smaller (stages/experiments/findings.py "
          "gives the formulas).")
