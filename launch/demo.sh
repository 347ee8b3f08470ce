#!/usr/bin/env bash
# Sets up (the CPU stack of requirements.txt) and runs the whole pipeline on the embedded demo data
# (two CPU cores: about 15 minutes, installation included; README "What the demo measured").
# Extra arguments go to axl_jax.main, e.g. --config.finetune.num_steps=100.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export TF_CPP_MIN_LOG_LEVEL=2 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m axl_jax.main --config=configs/demo.py --workdir="${WORKDIR:-runs/demo}" "$@"
