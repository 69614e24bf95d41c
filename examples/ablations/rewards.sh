#!/usr/bin/env bash
# Rewards: which terms train the policy (held-out scoring is the same rl3d eval for every arm).
# The reward files are in examples/ablations/rewards/ (terms and weights of the default preset).
#   STOP_AFTER=400 timeout 585 bash examples/ablations/rewards.sh      (one slice; rerun to continue)
EXPERIMENT=rewards
. "$(dirname "$0")/common.sh"
start_experiment
baseline hi-grpo "$(shipped_policy)" hi-grpo
arm all                                      # the default preset: alignment + spec + geometry
arm clip REWARDS="$ABLATIONS/rewards/clip.toml"
arm spec REWARDS="$ABLATIONS/rewards/spec.toml"
arm geometry REWARDS="$ABLATIONS/rewards/geometry.toml"
arm clip-spec REWARDS="$ABLATIONS/rewards/clip-spec.toml"
arm clip-geometry REWARDS="$ABLATIONS/rewards/clip-geometry.toml"
finish_experiment
