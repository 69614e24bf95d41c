#!/usr/bin/env bash
# Paradigm: flat GRPO on mesh tokens only vs flat with reasoning text vs Hi-GRPO; and which level
# is rewarded: level 1 only, level 2 only, both without back-flow (lambda 0) and with (lambda 1,
# the recipe of docs/rl.md). Every arm starts from the embedded default on the same prompts.
#   STOP_AFTER=400 timeout 585 bash examples/ablations/paradigm.sh     (one slice; rerun to continue)
#   DRY_RUN=1 bash examples/ablations/paradigm.sh                     (the arms, without running)
# Sizes: see common.sh (STEPS, PROMPTS, GROUP, SEEDS, BENCH_LIMIT, ...).
EXPERIMENT=paradigm
. "$(dirname "$0")/common.sh"
start_experiment
finding "Reasoning text before the mesh helps (paper: CLIP 22.7 -> 24.0)" \
  flat-reasoning '>' flat-mesh-only spec_all_correct clip_score
finding "Hi-GRPO beats flat GRPO (paper: 26.5 -> 29.3)" hi-grpo '>' flat-reasoning spec_all_correct clip_score
finding "Level 2 only beats level 1 only (paper: 26.0 vs 24.8)" level2-only '>' level1-only spec_all_correct clip_score
finding "Both levels beat level 2 only (paper: 28.7 vs 26.0)" hi-grpo '>' level2-only spec_all_correct clip_score
finding "Both levels beat level 1 only (paper: 28.7 vs 24.8)" hi-grpo '>' level1-only spec_all_correct clip_score
finding "Back-flow of R_low into level 1 (the paper's lambda 1) beats none" \
  hi-grpo '>' hi-grpo-lambda0 spec_all_correct clip_score
mesh_only=$(mesh_only_policy)
baseline hi-grpo "$(shipped_policy)" hi-grpo
baseline flat "$(shipped_policy)" flat
baseline flat-mesh-only "$mesh_only" flat
arm hi-grpo                                  # both levels, back-flow lambda 1: the base arm
arm flat-reasoning MODE=flat
arm flat-mesh-only MODE=flat POLICY0="$mesh_only"
arm hi-grpo-lambda0 LAMBDA=0
arm level1-only TRAIN_LEVELS=coarse LAMBDA=0   # only the coarse level's tokens train, on R_high alone
arm level2-only TRAIN_LEVELS=fine              # only the fine level's tokens train (on R_low)
finish_experiment
