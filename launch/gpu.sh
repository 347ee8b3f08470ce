#!/usr/bin/env bash
# One NVIDIA GPU: install the CUDA stack and run a config, e.g.
#   bash launch/gpu.sh configs/ict_p.py runs/ict_p --config.data.root=/data/mrtydi
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?config file}"; WORKDIR="${2:?workdir}"; shift 2
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -r requirements-gpu.txt
.venv/bin/python -m pip uninstall -q -y faiss-cpu || true
# JAX takes --config.jax_memory_fraction (0.75) of the GPU; FAISS and the generator use the rest.
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m axl_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.model.dtype=bfloat16 --config.model.attention_impl=cudnn "$@"
