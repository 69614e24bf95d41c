#!/usr/bin/env bash
# One Hi-GRPO iteration of the embedded default, end to end: synth prompts -> gen -> render ->
# reward -> rl-step, printing the seconds of each stage and completion tokens/s end to end.
# Default size: 64 prompts x G=8 x 2 levels, the default rewards, 6 views at 512 px (goal on one
# H100/H200: <= 40 s). Sizes are environment variables, so a CPU can run a tiny one:
#   PROMPTS=2 G=2 VIEWS=2 RES=64 bash benchmarks/bench_iteration.sh
#   bash benchmarks/bench_iteration.sh                      # the full iteration (GPU)
# Other knobs: RUN (work dir, default a temp dir, removed after), BACKEND (render backend, auto),
# SUPERSAMPLE (2, the render default), CONFIG (reward preset, default), MINIBATCH (rl-step, 0),
# BATCH (gen --batch-size, default: gen's own), RL3D (the command, default rl3d), PY (python, python3), EXTRA_GEN / EXTRA_RENDER /
# EXTRA_REWARD / EXTRA_RL (more options for one stage), KEEP=1 keeps RUN.
set -euo pipefail
PROMPTS=${PROMPTS:-64}; G=${G:-8}; VIEWS=${VIEWS:-6}; RES=${RES:-512}; SUPERSAMPLE=${SUPERSAMPLE:-2}
BACKEND=${BACKEND:-auto}; CONFIG=${CONFIG:-default}; MINIBATCH=${MINIBATCH:-0}; BATCH=${BATCH:-}
RL3D=${RL3D:-rl3d}; PY=${PY:-python3}
command -v "$RL3D" >/dev/null || RL3D="$PY -m rl3d.cli.main"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RUN=${RUN:-$(mktemp -d)}
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$RUN"' EXIT
declare -A SECS
stage() {  # stage NAME COMMAND...: run it, keep its wall seconds
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  "$@"
  SECS[$name]=$($PY -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$(date +%s.%N)")
}
$RL3D synth --n "$PROMPTS" --seed 1001 --split train --no-meshes --out "$RUN/prompts" --quiet
policy=$($PY -c "from rl3d.stages.policy import default_policy_dir; print(default_policy_dir())")
stage gen $RL3D gen --prompts "$RUN/prompts" --out "$RUN/gen" -G "$G" --seed 1 ${BATCH:+--batch-size $BATCH} --quiet ${EXTRA_GEN:-}
stage render $RL3D render --samples "$RUN/gen" --out "$RUN/renders" --views "$VIEWS" --resolution "$RES" \
  --supersample "$SUPERSAMPLE" --backend "$BACKEND" --no-sheet --quiet ${EXTRA_RENDER:-}
stage reward $RL3D reward --samples "$RUN/gen" --renders "$RUN/renders" --config "$CONFIG" --out "$RUN/rewards" \
  --quiet ${EXTRA_REWARD:-}
stage rl_step $RL3D rl-step --policy "$policy" --samples "$RUN/gen" --rewards "$RUN/rewards" --out "$RUN/step1" \
  --minibatch "$MINIBATCH" --quiet ${EXTRA_RL:-}
$PY - "$RUN" "$PROMPTS" "$G" "$VIEWS" "$RES" "${SECS[gen]}" "${SECS[render]}" "${SECS[reward]}" "${SECS[rl_step]}" <<'PY'
import sys
import pyarrow.parquet as pq
from rl3d.formats.tables import read_table

run, prompts, g, views, res = sys.argv[1], *map(int, sys.argv[2:6])
secs = dict(zip(("gen", "render", "reward", "rl-step"), map(float, sys.argv[6:10])))
t = read_table(f"{run}/gen", "samples", columns=["input_ids", "prompt_len", "status"]).to_pylist()
tokens = sum(len(r["input_ids"]) - r["prompt_len"] for r in t)
renders = read_table(f"{run}/renders", "renders", columns=["status"]).column("status").to_pylist()
total = sum(secs.values())
print(f"Hi-GRPO iteration: {prompts} prompts x G={g} x 2 levels = {len(t)} samples, "
      f"{views} views at {res} px ({renders.count('ok')} rendered views), {tokens} completion tokens")
print(f"{'stage':8s} {'seconds':>8s} {'share':>6s}  throughput")
rate = {"gen": f"{tokens / secs['gen']:,.0f} completion tok/s",
        "render": f"{renders.count('ok') / secs['render']:,.1f} views/s",
        "reward": f"{len(t) / secs['reward']:,.1f} samples/s",
        "rl-step": f"{tokens / secs['rl-step']:,.0f} completion tok/s"}
for k, v in secs.items():
    print(f"{k:8s} {v:8.2f} {100 * v / total:5.0f}%  {rate[k]}")
print(f"{'total':8s} {total:8.2f}        {tokens / total:,.0f} completion tok/s end to end (goal on GPU: <= 40 s)")
PY
