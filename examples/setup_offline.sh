# Install rl3d on a GPU machine that has torch, transformers and accelerate but no package access
# (a cluster node, an air-gapped box). Wheels for the rest come from a folder you fill elsewhere.
#
#   1. On a machine with package access, matching the GPU machine's Python and platform:
#        pip download --no-deps --only-binary=:all: -d wheels/ trimesh open3d-cpu rich click
#      (add what `python3 -c "import rl3d"` reports missing there; `pip download` without --no-deps
#       fetches a whole dependency tree if the GPU machine has nothing)
#   2. Copy wheels/ and this repository to the GPU machine, then, in the repository root:
#        . examples/setup_offline.sh            (WHEELS=wheels/ TARGET=/tmp/rl3d-site by default)
#      Nothing is downloaded: pip reads only the folder. `rl3d` is then a shell function and
#      PYTHONPATH points at TARGET, so `accelerate launch -m rl3d.cli.main ...` works too.
WHEELS=${WHEELS:-wheels}
TARGET=${TARGET:-/tmp/rl3d-site}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TARGET" "$WHEELS"/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$TARGET" . 2>&1 | grep -v WARNING
export PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rl3d() { python3 -m rl3d.cli.main "$@"; }
export -f rl3d
