#!/bin/bash
# llmx on a Cloud TPU pod slice: the same command on every host (worker=all); jax.distributed finds
# the coordinator and the host ranks from the TPU runtime's environment (llmx.distributed).
#
#   bash scripts/tpu_pod_train.sh my-tpu us-central2-b configs/llama_1b_v5e8.yaml mesh.fsdp=-1 \
#        train.run_dir=/mnt/shared/runs/1b
#
# Prerequisites on every host: this repository cloned at ~/llmx, `pip install -e ~/llmx[tpu]`, and the run
# directory on a filesystem every host mounts (e.g. Filestore/NFS at /mnt/shared).
set -euo pipefail
TPU=${1:?usage: tpu_pod_train.sh TPU_NAME ZONE CONFIG [section.key=value ...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
shift 3
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/llmx && python -m llmx.train --config $CONFIG $*"
