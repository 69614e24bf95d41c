# Shared by the experiment scripts of examples/ablations/ (sourced, not run). An experiment is a
# set of arms; an arm is examples/learning_run.sh with some knobs set, run once per seed from the
# same starting policy on the same training prompts (a seed changes only the sampling), then scored
# with `rl3d eval` on the held-out benchmarks. Layout under EXP_DIR (default runs/ablations/NAME):
#   experiment.json                          what the runs must share (the summariser checks it)
#   arms/ARM/seed-S/                         a learning_run.sh run (step-*/, metrics.parquet, arm.json)
#   arms/ARM/seed-S/eval/step-N/BENCH/       rl3d eval of that run's step-N checkpoint
#   baseline/NAME/eval/step-000000/BENCH/    rl3d eval of the starting policy (one per mode)
# Resumable: rerun to continue; finished steps and evaluations are skipped. STOP_AFTER=SECONDS
# ends the call cleanly (exit 3) before starting work past the budget, so an experiment goes
# through in slices of under 10 minutes. DRY_RUN=1 prints the arms' settings and eval commands.
# JOBS=N runs N seeds/baseline evaluations at once, spread over the GPUs (GPUS, default all): the
# default policy is small, so one run leaves a card mostly idle and several share it.
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
ABLATIONS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LEARNING_RUN="$ABLATIONS/../learning_run.sh"
command -v rl3d >/dev/null || { rl3d() { python3 -m rl3d.cli.main "$@"; }; export -f rl3d; }
RL3D=rl3d

EXP_DIR=${EXP_DIR:-runs/ablations/$EXPERIMENT}
SEEDS=${SEEDS:-"1 2 3"}           # training seeds per arm (sampling seeds GEN_SEED = 10000 * S)
ARMS=${ARMS:-}                    # only these arms (names as in the experiment script); empty = all
# training size: one H100 runs a step of these in about 2 minutes (docs/rl.md); a CPU wants
# STEPS=2 PROMPTS=4 GROUP=4 MINIBATCH=16 MICRO=8 SHARDS=1 VIEWS=2 RES=64 BATCH=64
export STEPS=${STEPS:-10} PROMPTS=${PROMPTS:-64} GROUP=${GROUP:-8} LR=${LR:-1e-4} MINIBATCH=${MINIBATCH:-64}
export MICRO=${MICRO:-32} SHARDS=${SHARDS:-4} WARMUP=${WARMUP:-16} KL_MAX=${KL_MAX:-10} BETA=${BETA:-0.01}
export VIEWS=${VIEWS:-4} RES=${RES:-128} BATCH=${BATCH:-512} FAILED=${FAILED:-penalty}
# held-out scoring: rl3d eval on each benchmark at the arm's last step, and every SCORE_EVERY steps
# before it when set (an arm's EVAL_AT knob names its own steps)
BENCHES=${BENCHES:-"synth-reasoning text-reasoning"}
SCORE_EVERY=${SCORE_EVERY:-}
BENCH_LIMIT=${BENCH_LIMIT:-}      # prompts per category (empty: the whole benchmark)
EVAL_SAMPLES=${EVAL_SAMPLES:-4}   # samples per prompt
EVAL_VIEWS=${EVAL_VIEWS:-4}
EVAL_RES=${EVAL_RES:-128}
EVAL_SUPERSAMPLE=${EVAL_SUPERSAMPLE:-1}
EVAL_SEED=${EVAL_SEED:-101}       # one sampling seed for every policy: the comparison is paired by prompt
STOP_AFTER=${STOP_AFTER:-0}       # seconds for this call; 0 = no limit
export ENGINE=${ENGINE:-steps}     # learning_run.sh's: steps (a command per stage) or train (one rl3d train)
DRY_RUN=${DRY_RUN:-0}
JOBS=${JOBS:-1}                   # runs at once (a seed of an arm, or a baseline's evaluation)
GPUS=${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | tr '\n' ' ' || true)}
log() { echo "[ablations:$EXPERIMENT] $(date +%T) $*"; }
declare -A BASELINE_OF=()           # "MODE|POLICY" -> the baseline that scores it at step 0

budget_left() {  # seconds of STOP_AFTER left (a large number without a budget); exit 3 when spent
  if [ "$STOP_AFTER" -le 0 ]; then echo 1000000; return; fi
  local left=$((STOP_AFTER - SECONDS))
  if [ "$left" -le 0 ]; then log "time budget of ${STOP_AFTER}s used; rerun to continue" >&2; exit 3; fi
  echo "$left"
}

# the embedded default (importlib only: importing the policy library would load transformers)
SHIPPED=$(python3 -c "from importlib.resources import files; print(files('rl3d.assets') / 'policy')")
shipped_policy() { echo "$SHIPPED"; }

# The shipped weights with sampling.max_reasoning_tokens = 0 in rl3d_policy.json: gen (training)
# and rl3d eval (held-out) then sample no reasoning text, only the forced <mesh-start> and mesh.
mesh_only_policy() {
  local d="$EXP_DIR/policies/mesh-only"
  if [ ! -f "$d/rl3d_policy.json" ] && [ "$DRY_RUN" != 1 ]; then
    mkdir -p "$EXP_DIR/policies"; rm -rf "$d.tmp"; cp -r "$(shipped_policy)" "$d.tmp"
    python3 - "$d.tmp/rl3d_policy.json" <<'EOF'
import json, sys
meta = json.load(open(sys.argv[1]))
sampling = meta.get("sampling") or {}
meta["sampling"] = {**(sampling if isinstance(sampling, dict) else {}), "max_reasoning_tokens": 0}
json.dump(meta, open(sys.argv[1], "w"), indent=2)
EOF
    mv "$d.tmp" "$d"
  fi
  echo "$d"
}

# experiment.json: what every run of EXP_DIR shares. A rerun with other sizes or another starting
# policy would mix experiments in one folder: refused (exit 2), use another EXP_DIR.
write_experiment() {
  local f="$EXP_DIR/experiment.json"
  [ "$DRY_RUN" = 1 ] && f=/dev/null
  [ "$DRY_RUN" = 1 ] || mkdir -p "$EXP_DIR"
  python3 - "$f" "$EXPERIMENT" "$(shipped_policy)" <<EOF
import json, sys
from pathlib import Path
from rl3d.stages.policy.checkpoint import weights_hash
out, experiment, start = sys.argv[1:]
# settings that change results; a folder holds runs of one set of them only
settings = {"STEPS": $STEPS, "PROMPTS": $PROMPTS, "GROUP": $GROUP, "LR": $LR, "MINIBATCH": $MINIBATCH,
            "WARMUP": $WARMUP, "KL_MAX": $KL_MAX, "BETA": $BETA, "VIEWS": $VIEWS, "RES": $RES, "FAILED": "$FAILED",
            "BENCHES": "$BENCHES", "BENCH_LIMIT": "$BENCH_LIMIT", "EVAL_SAMPLES": $EVAL_SAMPLES,
            "EVAL_VIEWS": $EVAL_VIEWS, "EVAL_RES": $EVAL_RES, "EVAL_SUPERSAMPLE": $EVAL_SUPERSAMPLE, "EVAL_SEED": $EVAL_SEED}
if "$ENGINE" != "steps":  # rl3d train draws its own training prompts: another experiment (folders before it had none)
    settings["ENGINE"] = "$ENGINE"
if "$SCORE_EVERY":  # recorded when set, likewise
    settings["SCORE_EVERY"] = int("$SCORE_EVERY")
new = {"experiment": experiment, "start_weights": weights_hash(Path(start)), "settings": settings,
       "command_env": {"SEEDS": "$SEEDS", "MICRO": $MICRO, "SHARDS": $SHARDS, "BATCH": $BATCH}}
if out == "/dev/null":
    print(json.dumps(new, indent=2)); sys.exit(0)
if Path(out).exists():
    old = json.loads(Path(out).read_text())
    keys = ("experiment", "start_weights", "settings")
    if any(old.get(k) != new[k] for k in keys):
        diff = [f"{k}: {old.get(k)} -> {new[k]}" for k in keys if old.get(k) != new[k]]
        print(f"{out}: this folder holds runs of other settings ({'; '.join(diff)}); use another EXP_DIR", file=sys.stderr)
        sys.exit(2)
    new["command_env"]["SEEDS"] = " ".join(dict.fromkeys(old["command_env"]["SEEDS"].split() + "$SEEDS".split()))
Path(out).write_text(json.dumps(new, indent=2) + "\n")
EOF
}

# finding "CLAIM" ARM OP OTHER METRIC...: one of the paper's findings this experiment tests, for
# `rl3d learning-summary ablations` to judge (stages/experiments/findings.py): ARM's held-out METRIC
# is higher (OP '>') or lower ('<') than OTHER's, paired by held-out prompt. A side is an arm or
# ARM@STEP (its runs' score at training step STEP; default: the last step both sides were scored
# at); a METRIC is a per-sample metric of rl3d eval on synth-reasoning (spec_all_correct,
# spec_accuracy, clip_score, ...) or BENCH:METRIC on another benchmark. Declared after
# start_experiment and before the arms, so that a call stopped by its budget has recorded them;
# every call records the script's findings anew (start_experiment's experiment.json has none).
finding() {
  [ $# -ge 5 ] || { echo "finding: expected \"CLAIM\" ARM OP OTHER METRIC..., got: $*" >&2; exit 2; }
  case $3 in '>'|'<') ;; *) echo "finding \"$1\": OP is '>' or '<', not '$3'" >&2; exit 2 ;; esac
  if [ "$DRY_RUN" = 1 ]; then echo "finding \"$1\": $2 $3 $4 on ${*:5}"; return; fi
  python3 - "$EXP_DIR/experiment.json" "$@" <<'EOF'
import json, sys
from pathlib import Path
path, claim, arm, op, other, *metrics = sys.argv[1:]
meta = json.loads(Path(path).read_text())
entry = {"claim": claim, "arm": arm, "op": op, "other": other, "metrics": metrics}
meta["findings"] = [f for f in meta.get("findings", []) if f["claim"] != claim] + [entry]
Path(path).write_text(json.dumps(meta, indent=2) + "\n")
EOF
}

device_name() {  # the card (or CPU) a call ran on, for the results' wall-time table
  # read all of nvidia-smi's lines first: `| head -1` under pipefail failed on a SIGPIPE with
  # several cards and appended a "CPU" line after the card's name
  local names; names=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true)
  if [ -n "$names" ]; then echo "${names%%$'\n'*}"; else echo "CPU ($(nproc --all) cores)"; fi
}

# eval_policy POLICY OUT MODE: each benchmark scored once (a finished report is skipped)
eval_policy() {
  local policy=$1 out=$2 mode=$3 bench metrics limit=()
  [ -n "$BENCH_LIMIT" ] && limit=(--limit "$BENCH_LIMIT")
  for bench in $BENCHES; do
    # KD/FD are distribution distances, not paired per prompt: left to a full rl3d eval
    case $bench in synth-reasoning) metrics=decode,clip,spec,geometry,diversity,reference_iou ;;
                   *) metrics=decode,clip,geometry,diversity ;; esac
    local cmd=($RL3D eval --bench "$bench" --policy "$policy" --out "$out/$bench" --mode "$mode"
               --metrics "$metrics" --samples-per-prompt "$EVAL_SAMPLES" --views "$EVAL_VIEWS"
               --resolution "$EVAL_RES" --supersample "$EVAL_SUPERSAMPLE" --seed "$EVAL_SEED" ${limit[@]+"${limit[@]}"} --quiet)
    if [ "$DRY_RUN" = 1 ]; then echo "  ${cmd[*]}"; continue; fi
    [ -f "$out/$bench/report.md" ] && continue
    budget_left >/dev/null
    log "eval $bench: $policy"
    mkdir -p "$out"
    local t0=$SECONDS
    "${cmd[@]}" > "$out/$bench.log" 2>&1 || { tail -3 "$out/$bench.log" >&2; exit 1; }
    printf 'eval-%s\t%s\t%s\n' "$bench" $((SECONDS - t0)) "$(device_name)" >> "$out/wall.tsv"
  done
}

# baseline NAME POLICY MODE: the starting policy scored as step 0 (once per experiment and mode)
baseline() {
  local d="$EXP_DIR/baseline/$1"
  BASELINE_OF["$3|$2"]=$1
  [ "$DRY_RUN" = 1 ] || mkdir -p "$d"
  [ "$DRY_RUN" = 1 ] || printf '{"arm": "%s", "baseline": true, "start_policy": "%s", "mode": "%s"}\n' "$1" "$2" "$3" > "$d/arm.json"
  run_job eval_policy "$2" "$d/eval/step-000000" "$3"
}

# arm NAME [KNOB=VALUE ...]: learning_run.sh with those knobs (MODE, REWARDS, LAMBDA, LOSS_AGG,
# RATIO, CLIP_LOW, CLIP_HIGH, DYNAMIC, BETA, TEMPERATURE, POLICY0, PROMPTS, STEPS; EVAL_AT = the
# steps to score, default the last) for every seed, each run scored at EVAL_AT
# (a point before the last while the later steps train).
arm() {
  local name=$1; shift
  local knobs=("$@") s run eval_at mode steps start
  if [ -n "${ARMS:-}" ] && [[ " $ARMS " != *" $name "* ]]; then return; fi
  mode=$(for k in "${knobs[@]}"; do case $k in MODE=*) echo "${k#MODE=}" ;; esac; done)
  mode=${mode:-hi-grpo}
  start=$(for k in "${knobs[@]}"; do case $k in POLICY0=*) echo "${k#POLICY0=}" ;; esac; done)
  start=${start:-$(shipped_policy)}
  eval_at=$(for k in "${knobs[@]}"; do case $k in EVAL_AT=*) echo "${k#EVAL_AT=}" ;; esac; done)
  steps=$(for k in "${knobs[@]}"; do case $k in STEPS=*) echo "${k#STEPS=}" ;; esac; done)
  steps=${steps:-$STEPS}
  eval_at=${eval_at:-$(score_steps "$steps")}
  for s in $SEEDS; do
    run="$EXP_DIR/arms/$name/seed-$s"
    if [ "$DRY_RUN" = 1 ]; then
      echo "arm $name seed $s: RUN=$run GEN_SEED=$((10000 * s)) HELDOUT=0 BASELINE=0 STEPS=$STEPS PROMPTS=$PROMPTS" \
        "GROUP=$GROUP LR=$LR MINIBATCH=$MINIBATCH MICRO=$MICRO SHARDS=$SHARDS WARMUP=$WARMUP KL_MAX=$KL_MAX BETA=$BETA" \
        "VIEWS=$VIEWS RES=$RES BATCH=$BATCH FAILED=$FAILED ENGINE=$ENGINE ${knobs[*]} bash examples/learning_run.sh"
      score_run "$run" "$eval_at" "$mode"
    else
      mkdir -p "$run"
      python3 - "$run/arm.json" "$EXPERIMENT" "$name" "$s" "${BASELINE_OF["$mode|$start"]:-}" "$mode" "${knobs[@]}" <<'EOF'
import json, sys
out, experiment, arm, seed, baseline, mode, *knobs = sys.argv[1:]
json.dump({"experiment": experiment, "arm": arm, "seed": int(seed), "baseline": baseline, "mode": mode,
           "knobs": dict(k.split("=", 1) for k in knobs)}, open(out, "w"), indent=2)
EOF
      run_job train_and_score "$run" "$name" "$s" "$steps" "$eval_at" "$mode" "$start" "${knobs[@]}"
    fi
  done
}

# score_steps STEPS: the steps an arm of STEPS steps is scored at without an EVAL_AT knob (as
# ablations.planned_steps reads them back)
score_steps() {
  python3 -c "from rl3d.stages.experiments.ablations import score_steps; import sys; print(*score_steps(int(sys.argv[1]), sys.argv[2]))" \
    "$1" "$SCORE_EVERY"
}
# save_every "STEPS": the largest number of steps that divides each step to score, so that rl3d
# train (ENGINE=train) writes a checkpoint at each of them
save_every() {
  python3 -c "import math, sys; print(math.gcd(*map(int, sys.argv[1:])))" $1
}

# train_and_score RUN ARM SEED STEPS EVAL_AT MODE START [KNOB=VALUE ...]: one seed of an arm
train_and_score() {
  local run=$1 name=$2 s=$3 steps=$4 eval_at=$5 mode=$6 start=$7; shift 7
  # trained, or scored already (a packed run keeps its scores, not its checkpoints: pack.sh)
  if ! complete_run "$run" "$steps" && ! all_scored "$run" "$eval_at"; then
    local left rc=0 t0=$SECONDS; left=$(budget_left)
    set_aside_packed "$run" "$name" "$s"
    log "train $name seed $s${CUDA_VISIBLE_DEVICES:+ (GPU $CUDA_VISIBLE_DEVICES)}"
    env POLICY0="$start" "$@" RUN="$run" GEN_SEED=$((10000 * s)) HELDOUT=0 BASELINE=0 STOP_AFTER="$left" \
      EVAL_EVERY="$(save_every "$eval_at")" RL3D="$RL3D" bash "$LEARNING_RUN" >> "$run/train.log" 2>&1 &
    local trainer=$! scorer src=0
    # a run scored at several steps scores each checkpoint while the later steps train, so that its
    # evaluations do not all wait for the last step (a 6-step run then fits in one slice)
    score_while_training "$run" "$eval_at" "$mode" "$trainer" & scorer=$!
    wait "$trainer" || rc=$?
    printf 'train\t%s\t%s\n' $((SECONDS - t0)) "$(device_name)" >> "$run/wall.tsv"
    wait "$scorer" || src=$?
    [ "$rc" = 3 ] || [ "$src" = 3 ] && { log "time budget used in $name seed $s; rerun to continue"; exit 3; }
    [ "$rc" = 0 ] || { tail -5 "$run/train.log" >&2; exit "$rc"; }
    [ "$src" = 0 ] || exit "$src"
  fi
  score_run "$run" "$eval_at" "$mode"
}
# score_while_training RUN "STEPS" MODE TRAINER: score each of STEPS as soon as its checkpoint is
# written (complete_run), while the TRAINER process lives; what is left when it ends is
# scored after training (score_run skips what is scored)
score_while_training() {
  local n
  for n in $2; do
    until complete_run "$1" "$n"; do
      kill -0 "$4" 2>/dev/null || return 0
      sleep "${SCORE_POLL:-5}"
    done
    score_run "$1" "$n" "$3"
  done
}
# set_aside_packed RUN ARM SEED: a packed run that must train again starts in an empty folder; the
# old attempt's metrics, rewards and any scores (of checkpoints that are gone) move to stale/.
set_aside_packed() {
  [ -f "$1/PACKED" ] || return 0
  local aside="$EXP_DIR/stale/$2/seed-$3.$(date -u +%Y%m%dT%H%M%S)"
  mkdir -p "$(dirname "$aside")"; mv "$1" "$aside"; mkdir -p "$1"; cp "$aside/arm.json" "$1/"
  log "$2 seed $3: a packed run without checkpoints; its old attempt moved to $aside"
}
score_run() {  # score_run RUN "STEPS" MODE: rl3d eval of the run's checkpoint at each of STEPS
  local n
  for n in $2; do
    eval_policy "$(checkpoint_of "$1" "$n")" "$1/eval/step-$(printf %06d "$n")" "$3"
  done
}

# run_job CMD...: CMD here with JOBS=1; else in the background in a free slot of JOBS, slot k on
# GPU k mod (number of GPUS), waiting for a slot first. An exit of 3 (budget used) or a failure
# is kept for finish_experiment, which waits for every job.
declare -A JOB_SLOT=()              # pid -> slot
FREE_SLOTS=($(seq 0 $((JOBS - 1))))
JOB_RC=0
run_job() {
  if [ "$JOBS" -le 1 ] || [ "$DRY_RUN" = 1 ]; then "$@"; return; fi
  while [ ${#FREE_SLOTS[@]} -eq 0 ]; do reap_job; done
  local slot=${FREE_SLOTS[0]} gpus=($GPUS)
  FREE_SLOTS=("${FREE_SLOTS[@]:1}")
  (
    [ ${#gpus[@]} -gt 0 ] && export CUDA_VISIBLE_DEVICES=${gpus[$((slot % ${#gpus[@]}))]}
    pin_to_cores "$slot"
    "$@"
  ) &
  JOB_SLOT[$!]=$slot
}
# pin_to_cores SLOT: this job (and what it starts) on its share of the cores we may use, so the
# stages' worker pools, which size themselves by CPU affinity, do not oversubscribe the machine
pin_to_cores() {
  command -v taskset >/dev/null || return 0
  local cores=($(python3 -c "import os; print(*sorted(os.sched_getaffinity(0)))"))
  local per=$((${#cores[@]} / JOBS))
  [ "$per" -ge 1 ] || return 0
  local mine=("${cores[@]:$(($1 * per)):$per}")
  taskset -cp "$(IFS=,; echo "${mine[*]}")" "$BASHPID" >/dev/null
}
reap_job() {  # wait for one job to end, free its slot, keep the worst exit (a failure over 3)
  local pid rc=0
  wait -n -p pid || rc=$?
  [ -n "${pid:-}" ] || return 0
  FREE_SLOTS+=("${JOB_SLOT[$pid]}"); unset "JOB_SLOT[$pid]"
  if [ "$rc" != 0 ] && { [ "$JOB_RC" = 0 ] || [ "$JOB_RC" = 3 ]; }; then JOB_RC=$rc; fi
}

checkpoint_of() {  # checkpoint_of RUN N: the policy a run holds after step N
  if [ "$ENGINE" = train ]; then echo "$1/checkpoints/step-$(printf %06d "$2")"
  else echo "$1/step-$(printf %06d "$2")/policy"; fi
}
complete_run() {  # the checkpoint's last file: rl-step's record, or rl3d train's state
  if [ "$ENGINE" = train ]; then [ -f "$(checkpoint_of "$1" "$2")/train_state.json" ]
  else [ -f "$(checkpoint_of "$1" "$2")/rl_step.json" ]; fi
}
all_scored() {  # all_scored RUN "STEPS": every benchmark's report of every step to score exists
  local n bench
  for n in $2; do for bench in $BENCHES; do
    [ -f "$1/eval/step-$(printf %06d "$n")/$bench/report.md" ] || return 1
  done; done
}

start_experiment() {
  log "EXP_DIR=$EXP_DIR seeds: $SEEDS; $STEPS steps of $PROMPTS prompts x G=$GROUP"
  write_experiment
}
finish_experiment() {
  [ "$DRY_RUN" = 1 ] && return
  while [ ${#JOB_SLOT[@]} -gt 0 ]; do reap_job; done
  [ "$JOB_RC" = 3 ] && { log "time budget used; rerun to continue"; exit 3; }
  [ "$JOB_RC" = 0 ] || exit "$JOB_RC"
  log "done; summary: rl3d learning-summary ablations $EXP_DIR --out DIR"
}
