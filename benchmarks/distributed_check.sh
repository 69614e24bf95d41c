# rl-step under a distributed launch against one process, on one batch (docs/rl.md "Scale"):
#   bash benchmarks/distributed_check.sh SAMPLES_DIR REWARDS_DIR [accelerate config]   (GPUs)
#   LAUNCH="torchrun --standalone --nproc_per_node 2" bash benchmarks/distributed_check.sh ...  (CPU, DDP)
# Prints the largest weight difference against the one-process step and the step's metrics.
set -euo pipefail
S=$1; R=$2; CONFIG=${3:-examples/accelerate/ddp.yaml}; N=${N:-2}; OUTDIR=${OUTDIR:-/tmp/distcheck}
LAUNCH=${LAUNCH:-accelerate launch --config_file $CONFIG --num_processes $N}
P=$(python3 -c "from rl3d.stages.policy import default_policy_dir; print(default_policy_dir())")
ARGS="--policy $P --samples $S --rewards $R --lr 1e-4 --minibatch 16 --micro-batch 4 --failed-rewards penalty --quiet"
rm -rf "$OUTDIR"; mkdir -p "$OUTDIR"
python3 -m rl3d.cli.main rl-step $ARGS --out "$OUTDIR/one" --run-metrics "$OUTDIR/one.parquet"
$LAUNCH -m rl3d.cli.main rl-step $ARGS --out "$OUTDIR/dist" --run-metrics "$OUTDIR/dist.parquet"
python3 - "$OUTDIR" "$P" <<'PY'
import sys
import pyarrow.parquet as pq
from safetensors.torch import load_file
out, p0 = sys.argv[1], sys.argv[2]
w0, w1, w2 = (load_file(f"{d}/model.safetensors") for d in (p0, f"{out}/one", f"{out}/dist"))
moved = max((w1[k].float() - w0[k].float()).abs().max().item() for k in w1)
apart = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
print(f"weights: max |one - initial| {moved:.3e}, max |one - distributed| {apart:.3e}, keys equal {w1.keys() == w2.keys()}")
for name in ("one", "dist"):
    t = pq.read_table(f"{out}/{name}.parquet").to_pydict()
    m = dict(zip(t["name"], t["value"]))
    print(name, {k: round(m[k], 6) for k in ("loss", "kl", "grad_norm", "updates", "kept_samples")})
PY
