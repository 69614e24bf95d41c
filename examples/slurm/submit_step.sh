#!/usr/bin/env bash
# Submit one step: gen, render and reward as N-task arrays (each waits for the previous stage),
# then rl-step on one multi-GPU node (NODES=K: on K nodes, through rl_step_multinode.sbatch).
#   RUN=runs/big PROMPTS=data/prompts POLICY=runs/big/step-000003/policy STEP=4 N=32 examples/slurm/submit_step.sh
# DRY_RUN=1 prints each sbatch line (a job id reads <gen>, <render>, ...) and submits nothing; it
# needs no Slurm and creates nothing.
set -euo pipefail
: "${RUN:?}" "${PROMPTS:?}" "${POLICY:?}" "${STEP:?}"
N=${N:-16}
STEP_DIR="$RUN/$(printf 'step-%06d' "$STEP")"
common="--export=ALL,RUN=$RUN,PROMPTS=$PROMPTS,POLICY=$POLICY,STEP_DIR=$STEP_DIR,SEED=$STEP"
show() {  # a command line as one line, quoting only the words that need it
  local a s="" plain='^[][A-Za-z0-9_./=:,@%+<>-]+$'
  for a in "$@"; do if [[ $a =~ $plain ]]; then s+="$a "; else s+="$(printf '%q' "$a") "; fi; done
  echo "${s% }"
}
exec 3>&1  # dry-run lines go to the script's stdout, past the $(...) that takes the job id
submit() {  # submit NAME SBATCH_ARGS...: the job id on stdout
  local name=$1; shift
  if [ -n "${DRY_RUN:-}" ]; then
    show sbatch --parsable "$@" >&3
    echo "<$name>"
  else
    sbatch --parsable "$@"
  fi
}
[ -n "${DRY_RUN:-}" ] || mkdir -p logs
g=$(submit gen --array=0-$((N - 1)) --gres=gpu:1 $common,STAGE=gen examples/slurm/step.sbatch)
r=$(submit render --array=0-$((N - 1)) --cpus-per-task=8 --dependency=afterok:$g $common,STAGE=render examples/slurm/step.sbatch)
w=$(submit reward --array=0-$((N - 1)) --gres=gpu:1 --dependency=afterok:$r $common,STAGE=reward examples/slurm/step.sbatch)
if [ "${NODES:-1}" -gt 1 ]; then  # rl-step over NODES nodes of 8 GPUs (rl_step_multinode.sbatch)
  u=$(submit rl-step --nodes="$NODES" --gres=gpu:8 --dependency=afterok:$w $common examples/slurm/rl_step_multinode.sbatch)
else
  u=$(submit rl-step --nodes=1 --gres=gpu:8 --dependency=afterok:$w $common,STAGE=rl-step examples/slurm/step.sbatch)
fi
echo "step $STEP: gen=$g render=$r reward=$w rl-step=$u"
