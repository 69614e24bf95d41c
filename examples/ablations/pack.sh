#!/usr/bin/env bash
# What the summary and a resumed experiment need from an experiment folder, without checkpoints,
# meshes or training renders: the settings and arm files, run metrics, wall times, logs, training
# rewards, and each evaluation's report, metrics, per-sample scores, prompts and every view of the
# first sample (for the render grid). A rerun of the experiment script on a packed folder skips
# every scored run, so a long experiment can go on in a later session on another machine; a run
# that was not scored is trained again from its start.
#   bash examples/ablations/pack.sh runs/ablations/paradigm OUT     -> OUT/paradigm/
set -euo pipefail
src=${1:?usage: pack.sh EXP_DIR OUT}; dst="${2:?usage: pack.sh EXP_DIR OUT}/$(basename "$src")"
[ -f "$src/experiment.json" ] || { echo "$src: no experiment.json (not an experiment folder)" >&2; exit 2; }
mkdir -p "$dst"
cd "$src"
find . -type f \( -name experiment.json -o -name arm.json -o -name wall.tsv -o -name '*.log' \
  -o -name metrics.parquet -o -path './arms/*/step-*/rewards/part-*.parquet' \
  -o -path '*/eval/*/report.md' -o -path '*/eval/*/prompts-*.jsonl' -o -path '*/eval/*/metrics/part-*.parquet' \
  -o -path '*/eval/*/*/per_sample.parquet' -o -path '*/eval/*/*/renders/part-*.parquet' \
  -o -path '*/eval/*/*/renders/_images/*-0-*/view-*.png' \) -print0 | xargs -0 -r cp --parents -t "$dst"
# A packed run has no checkpoints: it cannot continue, only be trained again. The mark tells the
# experiment script to move such a run aside before that, so that one run folder never holds the
# files of two attempts (common.sh, train_and_score).
for run in arms/*/seed-*; do
  [ -d "$dst/$run" ] && echo "packed $(date -u +%FT%TZ) without checkpoints" > "$dst/$run/PACKED"
done
du -sh "$dst" | cut -f1
