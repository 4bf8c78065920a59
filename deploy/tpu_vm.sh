#!/bin/bash
# Cloud TPU VM: create a spot TPU VM, install the trainer, train into a gs:// workdir.
#   TPU_NAME=my-tpu ZONE=us-central1-f BUCKET=my-bucket bash deploy/tpu_vm.sh
# A spot VM can be deleted at any time with its disk: the workdir is on gs://, so running
# this script again (a new VM) resumes from the last checkpoint. GCE sends SIGTERM about
# 30 s before a spot VM stops; the trainer saves and exits 75.
# One host (v2-8, v3-8, v4-8): the command runs on that host with runtime.strategy=auto
# (it finds the TPU through /dev/accel*). A multi-host slice (v4-32, ...) runs the same
# command on worker 0 only, with --set runtime.tpu=$TPU_NAME, as TensorFlow's TPUStrategy
# drives every host of the slice from one client (not tried here: no TPU on our machines).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET}"
ACCELERATOR=${ACCELERATOR:-v3-8}
VERSION=${VERSION:-tpu-vm-tf-2.16.1-pjrt}
WORKDIR=gs://$BUCKET/runs/cifar10_tpu
DATA=gs://$BUCKET/data/cifar10

gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
  --version="$VERSION" --spot 2>/dev/null || echo "TPU VM $TPU_NAME exists: reusing it"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=0 --command="
  set -e
  [ -d trainer ] || git clone https://github.com/OWNER/trainer.git trainer
  cd trainer && pip install -q -e '.[tpu]'
  launch train --config configs/cifar10_tpu.yaml --workdir $WORKDIR --set data.path=$DATA
"
