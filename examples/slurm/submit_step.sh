#!/usr/bin/env bash
# Submit one step: gen, render and reward as N-task arrays (each waits for the previous stage),
# then rl-step on one multi-GPU node (NODES=K: on K nodes, through rl_step_multinode.sbatch).
#   RUN=runs/big PROMPTS=data/prompts POLICY=runs/big/step-000003/policy STEP=4 N=32 examples/slurm/submit_step.sh
set -euo pipefail
: "${RUN:?}" "${PROMPTS:?}" "${POLICY:?}" "${STEP:?}"
N=${N:-16}
STEP_DIR="$RUN/$(printf 'step-%06d' "$STEP")"
common="--export=ALL,RUN=$RUN,PROMPTS=$PROMPTS,POLICY=$POLICY,STEP_DIR=$STEP_DIR,SEED=$STEP"
mkdir -p logs
g=$(sbatch --parsable --array=0-$((N - 1)) --gres=gpu:1 $common,STAGE=gen examples/slurm/step.sbatch)
r=$(sbatch --parsable --array=0-$((N - 1)) --cpus-per-task=8 --dependency=afterok:$g $common,STAGE=render examples/slurm/step.sbatch)
w=$(sbatch --parsable --array=0-$((N - 1)) --gres=gpu:1 --dependency=afterok:$r $common,STAGE=reward examples/slurm/step.sbatch)
if [ "${NODES:-1}" -gt 1 ]; then  # rl-step over NODES nodes of 8 GPUs (rl_step_multinode.sbatch)
  u=$(sbatch --parsable --nodes="$NODES" --gres=gpu:8 --dependency=afterok:$w $common examples/slurm/rl_step_multinode.sbatch)
else
  u=$(sbatch --parsable --nodes=1 --gres=gpu:8 --dependency=afterok:$w $common,STAGE=rl-step examples/slurm/step.sbatch)
fi
echo "step $STEP: gen=$g render=$r reward=$w rl-step=$u"
