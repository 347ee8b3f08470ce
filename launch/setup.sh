#!/usr/bin/env bash
# Creates .venv (if missing) and installs a requirements file into it: requirements.txt (the CPU stack the
# demo needs) unless another is named, e.g. requirements-test.txt (adds pytest and the PyTorch references
# the parity tests compare with). Called by the other launchers.
#   bash launch/setup.sh [requirements file]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
REQUIREMENTS="${1:-requirements.txt}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r "$REQUIREMENTS"
