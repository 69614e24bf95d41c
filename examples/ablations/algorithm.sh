#!/usr/bin/env bash
# Algorithm: the base Hi-GRPO recipe (token aggregation, token ratio, beta 0.01, no dynamic
# sampling, decoupled clip 0.2/0.28, top-p 0.95) against one change at a time.
#   STOP_AFTER=400 timeout 585 bash examples/ablations/algorithm.sh    (one slice; rerun to continue)
EXPERIMENT=algorithm
. "$(dirname "$0")/common.sh"
start_experiment
finding "Token ratio beats GSPO's sequence ratio (GSPO's own clip range)" base '>' gspo spec_all_correct clip_score
finding "Token ratio beats a sequence ratio (the token clip range)" base '>' gspo-ratio spec_all_correct clip_score
finding "Token-level loss averaging beats sequence-level" base '>' sequence-agg spec_all_correct clip_score
finding "Removing the KL term hurts" base '>' beta0 spec_all_correct clip_score
finding "Dynamic sampling helps" dynamic-sampling '>' base spec_all_correct clip_score
finding "Decoupled clip 0.2 / 0.28 beats symmetric 0.2 / 0.2" base '>' symmetric-clip spec_all_correct clip_score
baseline hi-grpo "$(shipped_policy)" hi-grpo
arm base
arm sequence-agg LOSS_AGG=sequence
arm gspo-ratio RATIO=sequence         # GSPO's sequence ratio with the base clip range: one change at a time
arm gspo RATIO=sequence CLIP_LOW=0.0003 CLIP_HIGH=0.0004   # GSPO as published: its own, much narrower range
arm beta0 BETA=0
arm dynamic-sampling DYNAMIC=zero-std
arm symmetric-clip CLIP_HIGH=0.2      # no clip-higher: 0.2 / 0.2
arm top-p-1 TOP_P=1.0                 # training groups sampled without the nucleus cut (held-out keeps 0.95)
finish_experiment
