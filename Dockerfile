# The trainer's image, used by deploy/tfjob.yaml and deploy/vertex_custom_job.yaml:
# this repository installed into /opt/trainer (a virtual environment at
# /opt/trainer/venv, the configs at /opt/trainer/configs), `launch` as the entry point,
# run as a non-root user (uid 10001) from its home folder.
#
#   CPU:  docker build -t us-docker.pkg.dev/PROJECT/trainer/trainer:cpu .
#   GPU:  docker build --build-arg EXTRAS=gpu -t us-docker.pkg.dev/PROJECT/trainer/trainer:gpu .
#   push: gcloud auth configure-docker us-docker.pkg.dev
#         docker push us-docker.pkg.dev/PROJECT/trainer/trainer:gpu
#   try:  docker run --rm us-docker.pkg.dev/PROJECT/trainer/trainer:cpu devices
#
# The image always has the gcs extra (google-cloud-storage): its runs keep their workdirs on
# gs://, whose lease it makes race-free (README, Clouds).
# EXTRAS is one of pyproject.toml's extras: cpu (tensorflow-cpu) or gpu
# (tensorflow[and-cuda]: CUDA and cuDNN come as pip wheels, so the GPU image needs no
# CUDA base image, only the NVIDIA driver and container toolkit on the host). BASE may
# be any Debian or Ubuntu image; one without Python's venv module (nvidia/cuda:*, say)
# gets python3 and python3-venv from apt (Python 3.10 or later, as pyproject.toml asks).
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG EXTRAS=cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/trainer/venv \
    PATH=/opt/trainer/venv/bin:$PATH

RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/trainer/venv \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin trainer

WORKDIR /opt/trainer
COPY pyproject.toml README.md ./
COPY launch ./launch
COPY trainer ./trainer
RUN pip install --upgrade pip && pip install "/opt/trainer[${EXTRAS},gcs]" && launch --version
COPY configs ./configs

USER 10001:10001
WORKDIR /home/trainer
ENTRYPOINT ["launch"]
CMD ["--help"]
