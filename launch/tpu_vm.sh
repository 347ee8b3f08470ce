#!/usr/bin/env bash
# Cloud TPU VM (all hosts of a pod slice run the same command), e.g.
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command \
#     "cd axl-jax && bash launch/tpu_vm.sh configs/ict_p.py /mnt/bucket/runs/ict_p"
# Each host feeds its local TPU cores. WORKDIR must be a shared file system path (local disk on a single
# host, or a bucket mounted with gcsfuse on a pod slice).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?config file}"; WORKDIR="${2:?workdir}"; shift 2
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -r requirements-tpu.txt
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m axl_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.model.dtype=bfloat16 --config.model.attention_impl=xla "$@"
