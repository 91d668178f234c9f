#!/bin/bash
# paxlite on a Cloud TPU VM slice (every host runs the same command: `--worker=all`):
#   TPU=my-v5p-64 ZONE=us-east5-a bash configs/launch/tpu-gcloud.sh [key=value ...]
#
# Create the slice first, e.g.
#   gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --accelerator-type v5p-64 --version v2-alpha-tpuv5
# `paxlite train` detects the Cloud TPU environment and joins every host into one run
# (jax.distributed.initialize). Checkpoints hold every host's shards, so run.dir must be a
# filesystem all hosts see: here a Cloud Storage bucket mounted with gcsfuse at ~/gcs on each host.
#
# Several slices (Multislice, e.g. `gcloud compute tpus queued-resources create ... --node-count 2`):
# devices then carry their slice index, and mesh.dcn_data=2 keeps every other axis inside a slice;
# run the same command with `gcloud compute tpus queued-resources ssh "$QR" --node=all --worker=all`.
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
BUCKET=${BUCKET:-my-paxlite-bucket}
CONFIG=${CONFIG:-configs/bench-1.7b.yaml}
RUN_DIR=${RUN_DIR:-'$HOME/gcs/runs/bench-1.7b'}   # expanded on the TPU hosts
OVERRIDES="mesh.data=1 mesh.fsdp=-1 train.batch_size=256 run.dir=$RUN_DIR $*"

# Plan on this machine first: 32 chips of a v5p-64 (two TensorCores each, one jax device per chip).
paxlite plan "$CONFIG" $OVERRIDES --devices 32 --platform tpu

gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all . "$TPU":~/paxlite
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  cd ~/paxlite
  pip install -q -e . 'jax[tpu]'
  mkdir -p \$HOME/gcs && (mountpoint -q \$HOME/gcs || gcsfuse --implicit-dirs $BUCKET \$HOME/gcs)
  paxlite train $CONFIG $OVERRIDES
"
