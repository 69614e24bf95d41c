# One resumable slice of the H100 learning run (docs/rl.md); call again to continue.
#   bash benchmarks/device_learning_call.sh   (on the lent GPU box, carry .whl)
[ -d /tmp/site/rl3d ] || . benchmarks/device_setup.sh
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
rl3d() { python3 -m rl3d.cli.main "$@"; }; export -f rl3d
export RUN=${RUN:-runs/learn}
mkdir -p runs
SHARDS=${SHARDS:-4} MICRO=${MICRO:-32} STEPS=${STEPS:-8} EVAL_EVERY=${EVAL_EVERY:-4} EVAL_N=32 VIEWS=4 LR=${LR:-1e-4} MINIBATCH=${MINIBATCH:-128} BATCH=512 \
  STOP_AFTER=${STOP_AFTER:-400} BASELINE=${BASELINE:-1} EVAL_ASYNC=${EVAL_ASYNC:-0} timeout 585 bash examples/learning_run.sh 2>&1 | tee -a $RUN.log | grep -v -i warn
rl3d learning-summary heldout $RUN >/dev/null 2>&1
cp $RUN/metrics.parquet $RUN/heldout_rewards.json $RUN.log "${OUT:-/tmp}/" 2>/dev/null
ls $RUN
