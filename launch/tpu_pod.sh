#!/usr/bin/env bash
# A Cloud TPU pod slice: the same command on every host; jax.distributed finds the slice by itself and each
# host feeds its own TPU chips. WORKDIR must be shared by all hosts (a bucket mounted with gcsfuse, or NFS).
#   bash launch/tpu_pod.sh TPU_NAME ZONE configs/axl.py /mnt/bucket/runs/axl [--config.field=value ...]
# After a preemption, run the same command again: every stage resumes from its last checkpoint.
set -euo pipefail
TPU="${1:?TPU name}"; ZONE="${2:?zone}"; CONFIG="${3:?config file}"; WORKDIR="${4:?workdir}"; shift 4
# The rounds' generator runs on each host before the run opens the chips, as a one-host slice of its own
# (TPU_PROCESS_BOUNDS=1,1,1) of the host's chips: GENERATOR_CHIPS is their layout and GENERATOR_VISIBLE their
# indices, 2,2,1 and 0,1,2,3 for the 4 chips of a v4 or v5p host. Not yet tried on a pod (README: many hosts).
GENERATOR_CHIPS="${GENERATOR_CHIPS:-2,2,1}"; GENERATOR_VISIBLE="${GENERATOR_VISIBLE:-0,1,2,3}"
GENERATOR_ENV="TPU_PROCESS_BOUNDS=1,1,1 TPU_CHIPS_PER_PROCESS_BOUNDS=$GENERATOR_CHIPS TPU_VISIBLE_CHIPS=$GENERATOR_VISIBLE"
ARGS=$(printf ' %q' "$CONFIG" "$WORKDIR" "--config.generator.env=$GENERATOR_ENV" "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="cd ~/axl-jax && bash launch/tpu_vm.sh$ARGS"
