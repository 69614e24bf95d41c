#!/usr/bin/env bash
# Train the default alignment scorer (a small CLIP) on synth renders and install it as the shipped
# one: synth -> render -> train-scorer -> assets/scorer/.
# One H100: ~5 min with the defaults below. CPU: a few minutes with
#   N=600 STEPS=300 BATCH=64 RES=128 examples/train_default_scorer.sh
set -euo pipefail
N=${N:-6000}            # synth objects (train and eval splits)
STEPS=${STEPS:-4000}    # optimiser steps
BATCH=${BATCH:-256}     # objects per step (one random view each)
RES=${RES:-128}         # render resolution (the scorer sees 128x128)
VIEWS=${VIEWS:-6}
WORK=${WORK:-runs/scorer}
SEED=${SEED:-0}
DEST=${DEST:-assets/scorer}

rl3d synth --n "$N" --seed "$SEED" --out "$WORK/objects"
rl3d render --samples "$WORK/objects" --views "$VIEWS" --resolution "$RES" --no-sheet \
  --workers "${WORKERS:-$(nproc)}" --out "$WORK/renders"
rl3d train-scorer --objects "$WORK/objects" --renders "$WORK/renders" --steps "$STEPS" \
  --batch-size "$BATCH" --seed "$SEED" --out "$WORK/scorer" --json | tee "$WORK/train_scorer.json"
mkdir -p "$DEST"
cp "$WORK"/scorer/* "$DEST"/
echo "installed the scorer in $DEST (eval top-1 of 16 in $DEST/scorer.json)"
