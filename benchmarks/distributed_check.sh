# rl-step under a distributed launch against one process, on one batch (docs/rl.md "Scale"):
#   bash benchmarks/distributed_check.sh SAMPLES_DIR REWARDS_DIR [accelerate config]   (GPUs)
#   LAUNCH="torchrun --standalone --nproc_per_node 2" bash benchmarks/distributed_check.sh ...  (CPU, DDP)
# POLICY (default: the shipped policy, tied embeddings), N (2 processes), MINIBATCH (16), MICRO (4)
# and OUTDIR (/tmp/distcheck; one per batch) override. One process runs twice: at micro-batch
# MICRO, and at another micro-batch as the noise floor (the same update split differently: on a
# GPU bf16 rounding alone moves it that much). Both are reused by later checks in the same OUTDIR.
# Prints each run's metrics, then one verdict line: PASS when the distributed step makes as many
# updates as one process and its weights are no further from one process's than the noise floor
# (2x, or 1e-3 of the update) and its checkpoint holds the same weight names (a tied policy stays tied).
set -euo pipefail
S=$1; R=$2; CONFIG=${3:-examples/accelerate/ddp.yaml}; N=${N:-2}; OUTDIR=${OUTDIR:-/tmp/distcheck}
LAUNCH=${LAUNCH:-accelerate launch --config_file $CONFIG --num_processes $N}
P=${POLICY:-$(python3 -c "from rl3d.stages.policy import default_policy_dir; print(default_policy_dir())")}
MB=${MINIBATCH:-16}; MICRO=${MICRO:-4}; NOISE_MICRO=$(( MICRO > 1 ? MICRO / 2 : 2 ))
ARGS="--policy $P --samples $S --rewards $R --lr 1e-4 --minibatch $MB --failed-rewards penalty --quiet"
TAG="$(basename "$P")-mb$MB"
mkdir -p "$OUTDIR"
# no --overwrite: a complete one-process step of the same policy and settings is reused
python3 -m rl3d.cli.main rl-step $ARGS --micro-batch "$MICRO" --out "$OUTDIR/one-$TAG-micro$MICRO"
python3 -m rl3d.cli.main rl-step $ARGS --micro-batch "$NOISE_MICRO" --out "$OUTDIR/one-$TAG-micro$NOISE_MICRO"
DIST="$OUTDIR/dist-$TAG-micro$MICRO-$(echo "$LAUNCH" | tr -c 'a-zA-Z0-9' _ | tail -c 60)"
$LAUNCH -m rl3d.cli.main rl-step $ARGS --micro-batch "$MICRO" --out "$DIST" --overwrite
python3 - "$P" "$OUTDIR/one-$TAG-micro$MICRO" "$OUTDIR/one-$TAG-micro$NOISE_MICRO" "$DIST" "$LAUNCH" <<'PY'
import json, sys
from safetensors.torch import load_file
initial, one, noise, dist, launch = sys.argv[1:]
w0, w1, wn, wd = (load_file(f"{d}/model.safetensors") for d in (initial, one, noise, dist))
m1, mn, md = (json.load(open(f"{d}/rl_step.json"))["metrics"] for d in (one, noise, dist))

keys = w0.keys() & w1.keys() & wd.keys()


def dist_l2(a, b):
    return sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in keys) ** 0.5

update = dist_l2(w1, w0)  # how far one process moved the weights
rel_dist, rel_noise = dist_l2(wd, w1) / update, dist_l2(wn, w1) / update
max_abs = max(float((wd[k].float() - w1[k].float()).abs().max()) for k in keys)
for name, m in (("one process", m1), (f"one process, micro-batch {noise.rsplit('micro', 1)[1]}", mn), ("distributed", md)):
    print(f"{name:>30}: updates {m['updates']} skipped {m['skipped_updates']} loss {m['loss']:.4f} "
          f"kl {m['kl']:.4g} grad_norm {m['grad_norm']:.4f}")
same_updates = (md["updates"], md["skipped_updates"]) == (m1["updates"], m1["skipped_updates"])
same_keys = wd.keys() == w1.keys() == w0.keys()
ok = same_updates and same_keys and rel_dist <= max(2 * rel_noise, 1e-3)
print(f"verdict: {'PASS' if ok else 'FAIL'} [{launch}] updates {md['updates']} vs {m1['updates']} "
      f"(skipped {md['skipped_updates']} vs {m1['skipped_updates']}); weights |dist - one| = {rel_dist:.2e} "
      f"of the update vs noise {rel_noise:.2e} (max abs {max_abs:.1e}, update {update:.2e}); "
      f"weight names {'same' if same_keys else 'DIFFER'}")
sys.exit(0 if ok else 1)
PY
