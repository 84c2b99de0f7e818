# app-dist for cluster nodes: CUDA runtime, Python 3.11, the pinned lock, a non-root user.
#
#   docker build -t app-dist:latest .
#   docker run --gpus all --rm --shm-size 8g -v /shared/data:/data -v /shared/runs:/workspace/runs \
#       app-dist:latest train --config configs/cifar10.yaml data.shards=/data/cifar10
#
# PyTorch's wheels bring their own CUDA 13 libraries (pinned in requirements.lock); the host
# needs an NVIDIA driver for CUDA 13 (>= 580) and the NVIDIA container toolkit. The base image
# is the matching CUDA runtime, which also sets the variables that toolkit reads.
# Ray's cluster launcher starts its containers with `bash` as the command: give it
# `run_options: ["--entrypoint="]` (cluster.yaml does).
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu22.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Exact apt versions are not pinned: the base image tag pins the distribution, and Ubuntu
# removes superseded versions from its mirrors, which would break every later build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The lock first, alone: this layer (torch, CUDA libraries, ...) is rebuilt only when it changes.
COPY requirements.lock ./
RUN pip install -r requirements.lock
COPY pyproject.toml README.md ./
COPY app_dist ./app_dist
RUN pip install --no-deps .

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    WANDB_MODE=offline
# rsync: Ray's cluster launcher copies file_mounts into the container with it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 ca-certificates rsync \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --user-group --shell /bin/bash app
# The venv belongs to the run user, so Ray's setup_commands can `pip install` into it.
COPY --from=build --chown=1000:1000 /opt/venv /opt/venv
WORKDIR /workspace
COPY --chown=1000:1000 configs ./configs
COPY --chown=1000:1000 launch ./launch
RUN mkdir -p runs data && chown 1000:1000 runs data
USER 1000:1000
ENTRYPOINT ["app-dist"]
CMD ["--help"]
