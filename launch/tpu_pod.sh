#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every host; jax.distributed finds the slice by itself and each
# host feeds its own TPU chips. WORKDIR must be shared by all hosts (a bucket mounted with gcsfuse, or NFS).
#   bash launch/tpu_pod.sh TPU_NAME ZONE configs/axl.py /mnt/bucket/runs/axl [--config.field=value ...]
# After a preemption, run the same command again: every stage resumes from its last checkpoint.
set -euo pipefail
TPU="${1:?TPU name}"; ZONE="${2:?zone}"; CONFIG="${3:?config file}"; WORKDIR="${4:?workdir}"; shift 4
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
  --command="cd ~/axl-jax && bash launch/tpu_vm.sh $CONFIG $WORKDIR $*"
