#!/usr/bin/env bash
# Set up rl3d in ./.venv on a fresh Debian/Ubuntu machine with Python >= 3.10.
# System package: open3d needs libusb-1.0-0 at import; installed here when we are root,
# otherwise the exact fix is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! ldconfig -p 2>/dev/null | grep -q libusb-1.0.so.0; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq libusb-1.0-0) >/dev/null
  else
    echo "rl3d setup: open3d needs libusb-1.0-0: run 'sudo apt-get install -y libusb-1.0-0' and retry" >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/pip --disable-pip-version-check -q"
# the CPU wheel of torch is preferred where it is on disk; elsewhere pip picks the platform's default
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0" 2>/dev/null || $PIP install torch
$PIP install -e ".[test]"
echo "rl3d setup: ready (.venv/bin/rl3d)" >&2
