#!/usr/bin/env bash
# The Hi-GRPO loop on the embedded default: `rl3d train` runs STEPS iterations of
# gen -> render -> reward -> update in one process (each step's tables in RUN/step-NNNNNN/, the same
# folders the single commands write; examples/Makefile runs those commands one by one), then
# `rl3d eval` scores the initial and the trained policy on held-out prompts.
# Resumable: rerun after a failure and it continues where it stopped.
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
# Measured with these defaults, setup excluded, from a fresh clone on the 2-core dev box with the cores
# quiet, 2026-12-07: 3 min 59 s, then 4 min 24 s and 4 min 35 s in later runs (train ~3 min, of which
# the update ~45 s a step and gen ~37 s; eval ~60 s). The same steps as single commands
# (examples/Makefile) took 5 min 17 s with the eval.
echo "[demo] $STEPS steps of $PROMPTS_N prompts x G=$GROUP, then an eval: about 4.5 min on a quiet 2-core CPU (measured)," \
     "several times that while other jobs load the cores. Every stage prints its progress at least every 10 s;" \
     "rerun to resume after an interruption."
initial=$($PY -c "from rl3d.stages.policy import default_policy_dir; print(default_policy_dir())")
echo "[demo] initial policy: $initial"
$RL3D synth --n "$PROMPTS_N" --seed 7 --split train --out "$RUN/prompts" --quiet
$RL3D train --prompts "$RUN/prompts" --prompts-per-step "$PROMPTS_N" --policy "$initial" --out "$RUN" \
            --steps "$STEPS" --save-every "$STEPS" -G "$GROUP" --mode hi-grpo --views "$VIEWS" --resolution "$RES" \
            --rewards default --lr "$LR" --seed "$SEED"
final=$(printf '%s/checkpoints/step-%06d' "$RUN" "$STEPS")
$RL3D eval --bench synth-reasoning --limit "$BENCH_LIMIT" --samples-per-prompt 1 \
           --policy "$initial" --policy "$final" --run "$RUN" --out "$RUN/eval"
echo "[demo] done: report at $RUN/eval/report.html, run metrics at $RUN/metrics.parquet, steps in $RUN/step-*/"
