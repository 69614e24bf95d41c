#!/usr/bin/env bash
# One batch, several first rl-steps from the shipped policy: how far does each setting move the
# policy from its reference (KL, grad norm)? Checks the LR warm-up against the lr 2e-4 jump seen on
# the H100 (docs/rl.md).   RUN=runs/warmup bash benchmarks/rl_warmup_check.sh
set -euo pipefail
RUN=${RUN:-runs/warmup}; PROMPTS=${PROMPTS:-16}; GROUP=${GROUP:-8}; MINIBATCH=${MINIBATCH:-32}
RL3D=${RL3D:-rl3d}
$RL3D synth --n "$PROMPTS" --seed 1001 --split train --no-meshes --out "$RUN/prompts" --quiet
$RL3D gen --prompts "$RUN/prompts" --out "$RUN/gen" -G "$GROUP" --seed 1 --quiet
$RL3D render --samples "$RUN/gen" --out "$RUN/renders" --views 4 --resolution 128 --no-sheet --quiet
$RL3D reward --samples "$RUN/gen" --renders "$RUN/renders" --config default --out "$RUN/rewards" --quiet
policy=$(python3 -c "from rl3d.stages.policy import default_policy_dir; print(default_policy_dir())")
for v in "1e-4 0" "2e-4 0" "2e-4 16"; do
  set -- $v
  d="$RUN/lr$1-warmup$2"
  # two steps on the same batch: the second measures KL to the initial policy after the first
  $RL3D rl-step --policy "$policy" --samples "$RUN/gen" --rewards "$RUN/rewards" --out "$d/step1" \
    --lr "$1" --warmup-updates "$2" --kl-max "${KL_MAX:-0}" --minibatch "$MINIBATCH" --run-metrics "$d/metrics.parquet" --quiet
  $RL3D rl-step --policy "$d/step1" --samples "$RUN/gen" --rewards "$RUN/rewards" --out "$d/step2" --allow-off-policy \
    --lr "$1" --warmup-updates "$2" --kl-max "${KL_MAX:-0}" --minibatch "$MINIBATCH" --run-metrics "$d/metrics.parquet" --quiet
done
python3 - "$RUN" <<'PY'
import sys, glob
from rl3d.stages.scoring.run_metrics import read_run_metrics
for f in sorted(glob.glob(f"{sys.argv[1]}/lr*/metrics.parquet")):
    m = read_run_metrics(f)
    print(f.split("/")[-2], " ".join(f"{k}=" + "/".join(f"{v:.3g}" for v in m[k][1])
                                      for k in ("kl", "grad_norm", "lr", "entropy", "skipped_updates")))
PY
