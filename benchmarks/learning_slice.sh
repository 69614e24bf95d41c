# One resumable slice of the learning run of docs/rl.md, for jobs with a wall-time limit (a Slurm
# partition of 10-minute jobs, a preemptible node): each call continues where the last stopped.
#   bash benchmarks/learning_slice.sh          (RUN=runs/learn; after `. examples/setup_offline.sh`
#                                               or with rl3d installed)
#   OUT=DIR: copy the run metrics, held-out rewards and log there after the slice.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
command -v rl3d >/dev/null || { rl3d() { python3 -m rl3d.cli.main "$@"; }; export -f rl3d; }
export RUN=${RUN:-runs/learn}
mkdir -p "$(dirname "$RUN")"
SHARDS=${SHARDS:-4} MICRO=${MICRO:-32} STEPS=${STEPS:-8} EVAL_EVERY=${EVAL_EVERY:-4} EVAL_N=32 VIEWS=4 LR=${LR:-1e-4} MINIBATCH=${MINIBATCH:-128} BATCH=512 \
  STOP_AFTER=${STOP_AFTER:-400} BASELINE=${BASELINE:-1} EVAL_ASYNC=${EVAL_ASYNC:-0} timeout 585 bash examples/learning_run.sh 2>&1 | tee -a "$RUN.log" | grep -v -i warn
rl3d learning-summary heldout "$RUN" >/dev/null 2>&1
[ -n "${OUT:-}" ] && cp "$RUN/metrics.parquet" "$RUN/heldout_rewards.json" "$RUN.log" "$OUT/" 2>/dev/null
ls "$RUN"
