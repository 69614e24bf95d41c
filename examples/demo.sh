#!/usr/bin/env bash
# The Hi-GRPO loop on the embedded default, step after step:
#   gen -> render -> reward -> rl-step, each step in RUN/step-NNNNNN/, then an eval of the result.
# Resumable: every stage skips work already complete, so rerunning after a failure continues.
# Usage: examples/demo.sh [RUN_DIR]   (env: STEPS, PROMPTS_N, GROUP, LR, VIEWS, RES, SEED)
set -euo pipefail
RUN=${1:-runs/demo}
STEPS=${STEPS:-2}
PROMPTS_N=${PROMPTS_N:-6}
GROUP=${GROUP:-4}
LR=${LR:-2e-5}
VIEWS=${VIEWS:-4}
RES=${RES:-160}
SEED=${SEED:-0}
BENCH_LIMIT=${BENCH_LIMIT:-1}
# rl3d from PATH, else the checkout's .venv (examples/setup.sh), else the current python
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${RL3D:-}" ]; then
  if command -v rl3d >/dev/null; then RL3D=rl3d
  elif [ -x "$HERE/.venv/bin/rl3d" ]; then RL3D="$HERE/.venv/bin/rl3d"
  else RL3D="python3 -m rl3d.cli.main"; fi
fi
PY=$(dirname "$(command -v rl3d 2>/dev/null || echo "$HERE/.venv/bin/rl3d")")/python
[ -x "$PY" ] || PY=python3

mkdir -p "$RUN"
# Measured with these defaults, setup excluded, on the 2-core dev box: 5 min 17 s with the cores quiet
# (2026-12-07; rl-step is about 55 s a step there, gen about 37 s);
# while other jobs kept the cores busy, step 1 alone took 9 min (load 1.5-5.4) and 12 min (load 4-7).
echo "[demo] $STEPS steps of $PROMPTS_N prompts x G=$GROUP, then an eval: about 5 min on a quiet 2-core CPU (measured)," \
     "several times that while other jobs load the cores. Every stage prints its progress at least every 10 s;" \
     "rerun to resume after an interruption."
policy=$($PY -c "from rl3d.stages.policy import default_policy_dir; print(default_policy_dir())")
echo "[demo] initial policy: $policy"
$RL3D synth --n "$PROMPTS_N" --seed 7 --split train --out "$RUN/prompts" --quiet

for i in $(seq 1 "$STEPS"); do
  step=$(printf 'step-%06d' "$i")
  d="$RUN/$step"
  echo "[demo] $step"
  $RL3D gen --prompts "$RUN/prompts" --policy "$policy" --out "$d/gen" --group-size "$GROUP" \
            --mode hi-grpo --seed $((SEED + i))
  $RL3D render --samples "$d/gen" --out "$d/renders" --views "$VIEWS" --resolution "$RES"
  $RL3D reward --samples "$d/gen" --renders "$d/renders" --config default --out "$d/rewards"
  $RL3D rl-step --policy "$policy" --samples "$d/gen" --rewards "$d/rewards" --out "$d/policy" \
                --lr "$LR" --seed "$SEED" --run-metrics "$RUN/metrics.parquet"
  policy="$d/policy"
done

$RL3D eval --bench synth-reasoning --limit "$BENCH_LIMIT" --samples-per-prompt 1 \
           --policy "$($PY -c "from rl3d.stages.policy import default_policy_dir; print(default_policy_dir())")" \
           --policy "$policy" --run "$RUN" --out "$RUN/eval"
echo "[demo] done: report at $RUN/eval/report.html, run metrics at $RUN/metrics.parquet"
