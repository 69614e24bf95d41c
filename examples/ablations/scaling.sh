#!/usr/bin/env bash
# Scaling: training prompts per step x1, x2, x3 at STEPS steps, and steps x1, x2, x3 at x1 prompts
# (one run per seed, scored at STEPS, 2 STEPS and 3 STEPS: the paper saw over-training hurt).
#   STOP_AFTER=400 timeout 585 bash examples/ablations/scaling.sh      (one slice; rerun to continue)
EXPERIMENT=scaling
. "$(dirname "$0")/common.sh"
start_experiment
# over-training is a curve (the learning-curves figure); its pairwise part, on the x1-prompts run
finding "Twice the RL steps helps a little" "prompts-x1@$((2 * STEPS))" '>' "prompts-x1@$STEPS" \
  spec_all_correct clip_score
finding "Three times the steps hurts (over-fitting the preference model)" \
  "prompts-x1@$((3 * STEPS))" '<' "prompts-x1@$((2 * STEPS))" clip_score text-reasoning:clip_score
baseline hi-grpo "$(shipped_policy)" hi-grpo
arm prompts-x1 STEPS=$((3 * STEPS)) EVAL_AT="$STEPS $((2 * STEPS)) $((3 * STEPS))"
arm prompts-x2 PROMPTS=$((2 * PROMPTS))
arm prompts-x3 PROMPTS=$((3 * PROMPTS))
finish_experiment
