# Source this on a machine that has torch/transformers/accelerate but cannot reach PyPI (our lent
# GPU box): installs rl3d (no deps) plus carried wheels (.whl/: trimesh) into /tmp/site.
#   . benchmarks/device_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . 2>&1 | grep -v WARNING
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rl3d() { python3 -m rl3d.cli.main "$@"; }
export -f rl3d
