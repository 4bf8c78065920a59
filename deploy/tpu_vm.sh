#!/bin/bash
# Cloud TPU VM: get a spot TPU VM (create it, reuse it, or replace a preempted one), ship
# this checkout to it, install the trainer and start training, detached, into a gs://
# workdir.
#   TPU_NAME=my-tpu ZONE=us-central1-f BUCKET=my-bucket bash deploy/tpu_vm.sh
# Settings (environment): TPU_NAME, ZONE, BUCKET (required); ACCELERATOR (v3-8);
# VERSION (the TPU software version; default below); MULTI_HOST (auto, yes or no).
#
# Preemption: GCE sends SIGTERM about 30 s before a spot VM stops; the trainer saves a
# checkpoint into gs://$BUCKET/runs/cifar10_tpu and exits 75. A preempted spot TPU stays
# PREEMPTED until it is deleted, so this script looks at the TPU first: absent -> create;
# PREEMPTED or TERMINATED -> delete, then create; READY -> reuse (unless it is training
# already); STOPPED -> start. Then it ships and starts the trainer, which resumes from the
# workdir's last checkpoint: after a preemption, run this script again.
#
# Software: TensorFlow comes from us, pinned (TF_TPU below), not from the TPU image: the
# tpu-vm-tf-X-* images preinstall TensorFlow X (tpu-vm-tf-2.16.1-pjrt, this script's old
# default, brought 2.16.1), which the 2.20-2.21 of our [tpu] extra would overwrite with
# another build and another libtpu. A single host therefore boots a base image
# without TensorFlow (tpu-ubuntu2204-base for v2-v4, the v2-alpha-* images for v5e, v5p,
# v6e: Google's "TPU software versions" table) and pip installs tensorflow-tpu==$TF_TPU
# with libtpu from Google's index. TF_TPU is 2.20.0: the newest tensorflow-tpu on PyPI
# when this was written (none of 2.21.0 yet, the cpu/gpu extras' version), inside [tpu].
#
# Multi-host slices (more than 8 cores/chips: v2-32, v3-32, v4-16, v5litepod-16, ...):
# TensorFlow's TPUStrategy drives every host of the slice from one client (worker 0,
# with --set runtime.tpu=$TPU_NAME), and the other hosts serve it through the TPU runtime
# of a `-pod` image, so a slice boots tpu-vm-tf-$TF_TPU-pod-pjrt: the same TensorFlow as
# the client we install. The archive and the install go to every host (--worker=all), the
# training command to worker 0 only. Some releases carry a suffix (2.18.0 came as
# ...-pjrt-v5e-and-v6 and ...-pjrt-v5p-and-below): if the create step says the
# version is unknown, list them with `gcloud compute tpus tpu-vm versions list
# --zone=$ZONE` and set VERSION. Not tried on a real TPU (none on our machines).
#
# Training runs detached (setsid, a new session without the ssh session's terminal, so a
# dropped ssh session sends it no SIGHUP; nohup would not do: the trainer sets its own
# SIGHUP handler, which saves and exits 75). Its output goes to ~/train.log on worker 0:
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/train.log'
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET}"
ACCELERATOR=${ACCELERATOR:-v3-8}
MULTI_HOST=${MULTI_HOST:-auto}
TF_TPU=2.20.0
LIBTPU_INDEX=https://storage.googleapis.com/libtpu-tf-releases/index.html
WORKDIR=gs://$BUCKET/runs/cifar10_tpu
DATA=gs://$BUCKET/data/cifar10
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TPU=(compute tpus tpu-vm)
WHERE=("$TPU_NAME" "--zone=$ZONE")

fail() {
  echo "tpu_vm.sh: $*" >&2
  exit 1
}

# One host or several: the number after the last "-" counts TensorCores (v2-v4, v5p) or
# chips (v5e, v6e); every generation has 8 of them per host at most.
size=${ACCELERATOR##*-}
generation=${ACCELERATOR%-*}
[[ $size =~ ^[0-9]+$ && $generation != "$ACCELERATOR" ]] || fail "ACCELERATOR=$ACCELERATOR is not of the form v4-8"
case $MULTI_HOST in
  auto) if ((size > 8)); then MULTI_HOST=yes; else MULTI_HOST=no; fi ;;
  yes | no) ;;
  *) fail "MULTI_HOST=$MULTI_HOST: use auto, yes or no" ;;
esac
if [[ -z ${VERSION:-} ]]; then
  if [[ $MULTI_HOST == yes ]]; then
    VERSION=tpu-vm-tf-$TF_TPU-pod-pjrt
  else
    case $generation in
      v2 | v3 | v4) VERSION=tpu-ubuntu2204-base ;;
      v5litepod | v5e) VERSION=v2-alpha-tpuv5-lite ;;
      v5p) VERSION=v2-alpha-tpuv5 ;;
      v6e) VERSION=v2-alpha-tpuv6e ;;
      *) fail "no default TPU software version for $ACCELERATOR: set VERSION" ;;
    esac
  fi
fi

create() {
  echo "Creating spot TPU VM $TPU_NAME ($ACCELERATOR, $VERSION) in $ZONE"
  gcloud "${TPU[@]}" create "${WHERE[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION" --spot ||
    fail "could not create TPU VM $TPU_NAME (gcloud's error above). An unknown version: gcloud compute tpus tpu-vm versions list --zone=$ZONE, then set VERSION"
}

# What is there now: describe's errors are shown unless they say the TPU does not exist.
errors=$(mktemp)
archive_dir=$(mktemp -d)
trap 'rm -rf "$errors" "$archive_dir"' EXIT
if found=$(gcloud "${TPU[@]}" describe "${WHERE[@]}" --format='value(state,acceleratorType)' 2>"$errors"); then
  read -r state type <<<"$found" || true
elif grep -q NOT_FOUND "$errors"; then
  state=ABSENT type=
else
  cat "$errors" >&2
  fail "could not look up TPU VM $TPU_NAME in $ZONE (gcloud's error above)"
fi
if [[ -n $type && $type != "$ACCELERATOR" && $state != ABSENT ]]; then
  fail "TPU VM $TPU_NAME exists as $type, not $ACCELERATOR: set ACCELERATOR=$type, or delete it (gcloud compute tpus tpu-vm delete $TPU_NAME --zone=$ZONE)"
fi
case $state in
  ABSENT) create ;;
  PREEMPTED | TERMINATED)
    echo "TPU VM $TPU_NAME is $state: deleting it and creating it again (the workdir on gs:// keeps the checkpoints)"
    gcloud "${TPU[@]}" delete "${WHERE[@]}" --quiet || fail "could not delete TPU VM $TPU_NAME (gcloud's error above)"
    create
    ;;
  STOPPED)
    echo "TPU VM $TPU_NAME is STOPPED: starting it"
    gcloud "${TPU[@]}" start "${WHERE[@]}" || fail "could not start TPU VM $TPU_NAME (gcloud's error above)"
    ;;
  READY)
    echo "TPU VM $TPU_NAME is READY: reusing it"
    # shellcheck disable=SC2016 # expanded on the TPU VM
    running=$(gcloud "${TPU[@]}" ssh "${WHERE[@]}" --worker=0 --command='pid=$(cat ~/train.pid 2>/dev/null) || exit 0; grep -qs launch "/proc/$pid/cmdline" && echo "$pid"; true')
    if [[ -n $running ]]; then
      echo "Worker 0 of $TPU_NAME is training already (pid $running): not starting a second run. Its log:"
      echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/train.log'"
      exit 0
    fi
    ;;
  *) fail "TPU VM $TPU_NAME is $state: run this again once it is READY (gcloud compute tpus tpu-vm describe $TPU_NAME --zone=$ZONE)" ;;
esac

# Ship this checkout's last commit (not uncommitted changes) to every host and install it.
[[ -z $(git -C "$HERE" status --porcelain --untracked-files=no) ]] ||
  echo "Note: uncommitted changes in $HERE are not shipped (the TPU VM gets commit $(git -C "$HERE" rev-parse --short HEAD))" >&2
git -C "$HERE" archive --format=tar.gz -o "$archive_dir/trainer.tar.gz" HEAD
gcloud "${TPU[@]}" scp "$archive_dir/trainer.tar.gz" "$TPU_NAME:trainer.tar.gz" --zone="$ZONE" --worker=all
gcloud "${TPU[@]}" ssh "${WHERE[@]}" --worker=all --command="
  set -e
  rm -rf ~/trainer && mkdir ~/trainer && tar -xzf ~/trainer.tar.gz -C ~/trainer
  cd ~/trainer && python3 -m pip install --user -q '.[tpu,gcs]' 'tensorflow-tpu==$TF_TPU' -f $LIBTPU_INDEX
"

train=(python3 -m launch train --config configs/cifar10_tpu.yaml --workdir "$WORKDIR" --set "data.path=$DATA")
[[ $MULTI_HOST == no ]] || train+=(--set "runtime.tpu=$TPU_NAME")
printf -v train_line '%q ' "${train[@]}"
gcloud "${TPU[@]}" ssh "${WHERE[@]}" --worker=0 --command="
  set -e
  cd ~/trainer
  echo \"--- \$(date): $train_line\" >> ~/train.log
  setsid bash -c '\"\$@\"; echo \"--- launch train exited with \$?\"' train $train_line >> ~/train.log 2>&1 < /dev/null &
  echo \$! > ~/train.pid
"
echo "Training started on worker 0 of $TPU_NAME, detached: it goes on without this ssh session. Its log:"
echo "  gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=0 --command='tail -f ~/train.log'"
echo "After a preemption, run this script again: it replaces the TPU VM and the run resumes from $WORKDIR."
