#!/usr/bin/env bash
# Rewards: which terms train the policy (held-out scoring is the same rl3d eval for every arm).
# The reward files are in examples/ablations/rewards/ (terms and weights of the default preset).
#   STOP_AFTER=400 timeout 585 bash examples/ablations/rewards.sh      (one slice; rerun to continue)
EXPERIMENT=rewards
. "$(dirname "$0")/common.sh"
start_experiment
# the paper: a human-preference reward carries most of the gain, other rewards alone help little
# (CLIP score is our preference reward, and the paper's measure of gain)
finding "The preference reward carries the gain: CLIP alone beats spec alone" \
  clip '>' spec clip_score text-reasoning:clip_score
finding "The preference reward carries the gain: CLIP alone beats geometry alone" \
  clip '>' geometry clip_score text-reasoning:clip_score
finding "Spec alone helps little: adding CLIP to it helps" clip-spec '>' spec clip_score text-reasoning:clip_score
finding "Geometry alone helps little: adding CLIP to it helps" \
  clip-geometry '>' geometry clip_score text-reasoning:clip_score
baseline hi-grpo "$(shipped_policy)" hi-grpo
arm all                                      # the default preset: alignment + spec + geometry
arm clip REWARDS="$ABLATIONS/rewards/clip.toml"
arm spec REWARDS="$ABLATIONS/rewards/spec.toml"
arm geometry REWARDS="$ABLATIONS/rewards/geometry.toml"
arm clip-spec REWARDS="$ABLATIONS/rewards/clip-spec.toml"
arm clip-geometry REWARDS="$ABLATIONS/rewards/clip-geometry.toml"
finish_experiment
