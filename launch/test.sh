#!/usr/bin/env bash
# Sets up and runs the test suite (CPU; some tests simulate 4 devices in subprocesses).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh requirements-test.txt
export TF_CPP_MIN_LOG_LEVEL=2 TOKENIZERS_PARALLELISM=false JAX_PLATFORMS=cpu
exec .venv/bin/python -m pytest -q tests "$@"
