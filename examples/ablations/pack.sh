#!/usr/bin/env bash
# What the summary and a resumed experiment need from an experiment folder, without meshes or
# training renders: the settings and arm files, run metrics, wall times, logs, training rewards,
# and each evaluation's report, metrics, per-sample scores, prompts and every view of the first
# sample (for the render grid). A rerun of the experiment script on a packed folder skips every
# scored run, so a long experiment can go on in a later session on another machine.
#   bash examples/ablations/pack.sh runs/ablations/paradigm OUT                 -> OUT/paradigm/
#   bash examples/ablations/pack.sh runs/ablations/paradigm OUT --checkpoints   (runs continue)
# Without --checkpoints a run that was not scored is trained again from its start. With it, a run of
# `rl3d train` (ENGINE=train) keeps its settings (train.json) and every checkpoint it still needs: its
# newest, which it continues from exactly (weights, optimizer, RNG, data position), and each one of
# a step to score that is not scored yet (~120 MB a checkpoint of the embedded default).
set -euo pipefail
usage="usage: pack.sh EXP_DIR OUT [--checkpoints]"
src=${1:?$usage}; out=${2:?$usage}; with_checkpoints=0
case ${3:-} in "") ;; --checkpoints) with_checkpoints=1 ;; *) echo "$usage" >&2; exit 2 ;; esac
dst="$out/$(basename "$src")"
[ -f "$src/experiment.json" ] || { echo "$src: no experiment.json (not an experiment folder)" >&2; exit 2; }
mkdir -p "$dst"
dst=$(cd "$dst" && pwd)
cd "$src"
find . -type f \( -name experiment.json -o -name arm.json -o -name wall.tsv -o -name '*.log' \
  -o -name metrics.parquet -o -path './arms/*/step-*/rewards/part-*.parquet' \
  -o -path '*/eval/*/report.md' -o -path '*/eval/*/prompts-*.jsonl' -o -path '*/eval/*/metrics/part-*.parquet' \
  -o -path '*/eval/*/*/per_sample.parquet' -o -path '*/eval/*/*/renders/part-*.parquet' \
  -o -path '*/eval/*/*/renders/_images/*-0-*/view-*.png' \) -print0 | xargs -0 -r cp --parents -t "$dst"
# the checkpoints a run of rl3d train needs to go on: its newest complete one (train_state.json is
# written last) unless it is the run's last step, and each one of a step to score (EVAL_AT, else
# the last) whose benchmarks are not all scored
needed_checkpoints() {
  python3 - "$1" <<'PY'
import json, sys
from pathlib import Path
from rl3d.stages.experiments.ablations import score_steps
run = Path(sys.argv[1])
settings = json.load(open("experiment.json"))["settings"]
knobs = json.load(open(run / "arm.json")).get("knobs", {})
last = int(knobs.get("STEPS") or settings["STEPS"])
scored_at = {int(n) for n in str(knobs["EVAL_AT"]).split()} if knobs.get("EVAL_AT") else \
    set(score_steps(last, settings.get("SCORE_EVERY")))  # as ablations.planned_steps
benches = str(settings.get("BENCHES") or "").split()
done = sorted(c for c in (run / "checkpoints").glob("step-*") if (c / "train_state.json").is_file())
need = {c for c in done if int(c.name[5:]) in scored_at
        and any(not (run / "eval" / c.name / b / "report.md").is_file() for b in benches)}
if done and int(done[-1].name[5:]) < last:
    need.add(done[-1])
print("\n".join(str(c) for c in sorted(need)))
PY
}
for run in arms/*/seed-*; do
  [ -d "$dst/$run" ] || continue
  needed=""
  if [ "$with_checkpoints" = 1 ] && [ -f "$run/train.json" ]; then
    needed=$(needed_checkpoints "$run") || { echo "pack.sh: $src/$run: cannot list its checkpoints" >&2; exit 1; }
  fi
  if [ -n "$needed" ]; then
    cp --parents -t "$dst" "$run/train.json"
    for c in $needed; do cp -r --parents -t "$dst" "$c"; done
    continue
  fi
  # a packed run without checkpoints cannot continue, only be trained again. The mark tells the
  # experiment script to move such a run aside before that, so that one run folder never holds the
  # files of two attempts (common.sh, train_and_score).
  echo "packed $(date -u +%FT%TZ) without checkpoints" > "$dst/$run/PACKED"
done
du -sh "$dst" | cut -f1
