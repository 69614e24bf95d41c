#!/usr/bin/env bash
# Evidence that Hi-GRPO learns: train the embedded default with the default rewards and track the
# reward on held-out prompts (synth eval split) at several sampling seeds.
#   RUN=runs/learn STEPS=12 bash examples/learning_run.sh
# The settings that raised held-out reward on one H100 (docs/rl.md):
#   PROMPTS=64 LR=1e-4 MINIBATCH=64 MICRO=32 SHARDS=4 EVAL_ASYNC=1 STEPS=10 bash examples/learning_run.sh
# Resumable: rerun to continue (finished stages and steps are skipped). Meant for one GPU; on CPU,
# shrink PROMPTS / GROUP / EVAL_N.
# ENGINE=train runs the steps in one resident `rl3d train` (its checkpoints RUN/checkpoints/step-N
# are the policies scored; training prompts are its `--prompts synth`, seeded by GEN_SEED, so
# PROMPT_SEED and SHARDS do not apply to training); the default, ENGINE=steps, one command a stage.
set -euo pipefail
RUN=${RUN:-runs/learn}
STEPS=${STEPS:-12}
PROMPTS=${PROMPTS:-32}        # training prompts per step (fresh ones each step)
GROUP=${GROUP:-8}             # G
LR=${LR:-2e-5}
MINIBATCH=${MINIBATCH:-64}    # sequences per optimizer update (several updates per step)
MICRO=${MICRO:-auto}          # sequences per forward pass (exact gradient accumulation): auto = 8 on a CPU, by memory on a GPU
KL_MAX=${KL_MAX:-10}          # per-token k3 cap (verl's low_var_kl); 0 = uncapped
WARMUP=${WARMUP:-16}          # optimizer updates of linear LR warm-up (counted across steps)
BETA=${BETA:-0.01}
EVAL_N=${EVAL_N:-48}          # held-out prompts
EVAL_EVERY=${EVAL_EVERY:-4}
EVAL_SEEDS=${EVAL_SEEDS:-"101 102"}
VIEWS=${VIEWS:-6}
RES=${RES:-128}
EVAL_G=${EVAL_G:-4}
BATCH=${BATCH:-512}           # gen batch size (sequences sampled together; large on a GPU)
RL3D=${RL3D:-rl3d}
FAILED=${FAILED:-penalty}     # a sample with an empty mesh: penalty (scored FAILED_PENALTY) or drop-group
FAILED_PENALTY=${FAILED_PENALTY:-0}
SHARDS=${SHARDS:-1}           # parallel processes per gen/render/reward (a small policy leaves a GPU idle)
EVAL_ASYNC=${EVAL_ASYNC:-0}   # 1: score a checkpoint in the background while training goes on
BASELINE=${BASELINE:-1}       # 0: skip scoring the initial policy (already scored with these settings)
STOP_AFTER=${STOP_AFTER:-0}   # seconds; >0: stop cleanly (exit 3) before starting work past this
# Knobs of the ablations (examples/ablations/); the defaults are the recipe above.
POLICY0=${POLICY0:-}          # starting policy (default: the embedded default)
MODE=${MODE:-hi-grpo}         # hi-grpo (coarse + fine, rl-step --algo hi-grpo) or flat (one level, --algo grpo)
REWARDS=${REWARDS:-}          # reward preset or TOML file (default: default for hi-grpo, flat for flat)
LAMBDA=${LAMBDA:-1.0}         # back-flow of R_low into R_high
LOSS_AGG=${LOSS_AGG:-token}   # token | sequence | dr-grpo
RATIO=${RATIO:-token}         # token | sequence (GSPO)
CLIP_LOW=${CLIP_LOW:-0.2}
CLIP_HIGH=${CLIP_HIGH:-0.28}  # = CLIP_LOW: no decoupled (clip-higher) clip
DYNAMIC=${DYNAMIC:-off}       # dynamic sampling: off | zero-std | min-std:X
TRAIN_LEVELS=${TRAIN_LEVELS:-all}  # hi-grpo: all | coarse | fine (the level whose tokens train)
TEMPERATURE=${TEMPERATURE:-}  # gen sampling temperature (default: the policy's)
TOP_P=${TOP_P:-}              # gen nucleus mass (default: the policy's, 0.95)
PROMPT_SEED=${PROMPT_SEED:-1000}  # step i trains on synth train prompts of seed PROMPT_SEED + i
GEN_SEED=${GEN_SEED:-0}       # step i samples with seed GEN_SEED + i (the training seed of an arm)
HELDOUT=${HELDOUT:-1}         # 0: no held-out scoring here (the ablations score with rl3d eval)
ENGINE=${ENGINE:-steps}       # steps: a command per stage and step; train: one resident rl3d train
log() { echo "[learn] $(date +%T) $*"; }
# A stop between stages leaves nothing half-written, so a time-limited job (Slurm, a preemptible GPU node)
# can end early and the rerun continues; a finished stage is skipped and costs only start-up.
check_time() {
  if [ "$STOP_AFTER" -gt 0 ] && [ "$SECONDS" -ge "$STOP_AFTER" ]; then
    log "time budget of ${STOP_AFTER}s used; rerun to continue"; exit 3
  fi
}

# one stage as $SHARDS processes side by side (the stages' --shard I/N contract); a failed shard
# fails the run and the rerun redoes only unfinished shards
sharded() {
  local pids=() i
  for ((i = 0; i < SHARDS; i++)); do "$@" --shard "$i/$SHARDS" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p"; done
}
complete() { [ "$(ls "$1"/_shards/*-of-"$(printf %05d "$SHARDS")".json 2>/dev/null | wc -l)" -eq "$SHARDS" ]; }

policy0=${POLICY0:-$(python3 -c "from rl3d.stages.policy import default_policy_dir; print(default_policy_dir())")}
if [ "$MODE" = flat ]; then algo=grpo; else algo=hi-grpo; fi
if [ "$MODE" = flat ]; then heldout_rewards=flat; else heldout_rewards=default; fi
REWARDS=${REWARDS:-$heldout_rewards}  # held-out scoring keeps the preset whatever the training reward
sampling=(); [ -n "$TEMPERATURE" ] && sampling=(--temperature "$TEMPERATURE")
[ -n "$TOP_P" ] && sampling+=(--top-p "$TOP_P")
mkdir -p "$RUN"
$RL3D synth --n "$EVAL_N" --seed 999 --split eval --no-meshes --out "$RUN/heldout" --quiet

score() {  # score POLICY NAME: held-out gen -> render -> reward, one directory per sampling seed
  for s in $EVAL_SEEDS; do
    d="$RUN/eval/$2/seed-$s"
    complete "$d/rewards" && continue
    check_time
    log "eval $2 seed $s"
    sharded $RL3D gen --prompts "$RUN/heldout" --policy "$1" --out "$d/gen" -G "$EVAL_G" --seed "$s" --batch-size "$BATCH" --mode "$MODE" --quiet
    sharded $RL3D render --samples "$d/gen" --out "$d/renders" --views "$VIEWS" --resolution "$RES" --no-sheet --quiet
    sharded $RL3D reward --samples "$d/gen" --renders "$d/renders" --config "$heldout_rewards" --out "$d/rewards" --quiet
  done
}

scoring=()
score_checkpoint() {  # score_checkpoint POLICY NAME, beside training when EVAL_ASYNC=1
  if [ "$HELDOUT" = 0 ]; then return; fi
  if [ "$EVAL_ASYNC" = 1 ]; then score "$@" & scoring+=($!); else score "$@"; fi
}
update=(--lambda "$LAMBDA" --loss-agg "$LOSS_AGG" --ratio "$RATIO" --clip-low "$CLIP_LOW" --clip-high "$CLIP_HIGH"
        --dynamic-sampling "$DYNAMIC" --train-levels "$TRAIN_LEVELS" --lr "$LR" --warmup-updates "$WARMUP"
        --kl-max "$KL_MAX" --minibatch "$MINIBATCH" --micro-batch "$MICRO" --beta "$BETA"
        --failed-rewards "$FAILED" --failed-penalty "$FAILED_PENALTY")
evaluated() { [ $(($1 % EVAL_EVERY)) -eq 0 ] || [ "$1" -eq "$STEPS" ]; }
if [ "$BASELINE" = 1 ]; then score_checkpoint "$policy0" step-000000; fi
if [ "$ENGINE" = train ]; then
  check_time
  limit=(); [ "$STOP_AFTER" -gt 0 ] && limit=(--time-limit "$((STOP_AFTER - SECONDS))")
  log "rl3d train: $STEPS steps"
  $RL3D train --prompts synth --policy "$policy0" --out "$RUN" --steps "$STEPS" --prompts-per-step "$PROMPTS" \
    -G "$GROUP" --mode "$MODE" --views "$VIEWS" --resolution "$RES" --no-sheet --rewards "$REWARDS" --seed "$GEN_SEED" \
    --gen-batch-size "$BATCH" --save-every "$EVAL_EVERY" --keep-checkpoints 0 ${sampling[@]+"${sampling[@]}"} \
    "${update[@]}" ${limit[@]+"${limit[@]}"} --quiet
  for i in $(seq 1 "$STEPS"); do
    step=$(printf 'step-%06d' "$i")
    if evaluated "$i" && [ -f "$RUN/checkpoints/$step/train_state.json" ]; then
      score_checkpoint "$RUN/checkpoints/$step" "$step"
    fi
  done
  for pid in ${scoring[@]+"${scoring[@]}"}; do wait "$pid"; done
  if [ ! -f "$RUN/checkpoints/$(printf 'step-%06d' "$STEPS")/train_state.json" ]; then
    log "time budget of ${STOP_AFTER}s used; rerun to continue"; exit 3
  fi
  "$RL3D" learning-summary heldout "$RUN"
  exit 0
fi
policy=$policy0
for i in $(seq 1 "$STEPS"); do
  step=$(printf 'step-%06d' "$i"); d="$RUN/$step"
  if [ ! -f "$d/policy/rl_step.json" ]; then  # written last by rl-step: the step is done
    check_time
    log "$step gen"
    $RL3D synth --n "$PROMPTS" --seed $((PROMPT_SEED + i)) --split train --no-meshes --out "$d/prompts" --quiet
    sharded $RL3D gen --prompts "$d/prompts" --policy "$policy" --out "$d/gen" -G "$GROUP" --seed $((GEN_SEED + i)) --batch-size "$BATCH" \
      --mode "$MODE" ${sampling[@]+"${sampling[@]}"} --quiet
    log "$step render"
    sharded $RL3D render --samples "$d/gen" --out "$d/renders" --views "$VIEWS" --resolution "$RES" --no-sheet --quiet
    log "$step reward"
    sharded $RL3D reward --samples "$d/gen" --renders "$d/renders" --config "$REWARDS" --out "$d/rewards" --quiet
    log "$step rl-step"
    $RL3D rl-step --policy "$policy" --samples "$d/gen" --rewards "$d/rewards" --out "$d/policy" \
      --algo "$algo" "${update[@]}" --run-metrics "$RUN/metrics.parquet" --quiet
  fi
  policy="$d/policy"
  if evaluated "$i"; then
    score_checkpoint "$policy" "$step"
  fi
done
# background scoring: a failed one fails the run (set -e) and leaves its seed dir for the rerun
for pid in ${scoring[@]+"${scoring[@]}"}; do wait "$pid"; done
"$RL3D" learning-summary heldout "$RUN"
