# syntax=docker/dockerfile:1
# Two images from one file (README, "Docker"):
#   docker build --target serving -t lesson2/serving:0.1.0 .   ONNX Runtime, gRPC + HTTP, no torch
#   docker build --target trainer -t lesson2/trainer:0.1.0 .   PyTorch (CUDA wheels from PyPI)
# Both run as uid/gid 10001, which deploy/ names in volumes and Kubernetes' runAsUser.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/app --shell /usr/sbin/nologin app
WORKDIR /app


FROM base AS serving
# CUDA=1 adds onnxruntime-gpu's [cuda,cudnn] extras: the CUDA 13 and cuDNN 9 libraries from PyPI,
# so that `docker run --gpus all` runs on the GPU with no CUDA base image. The default stays CPU-only.
ARG CUDA=0
COPY pyproject.toml README.md ./
COPY serving/ serving/
# Only the serving package and its dependencies, pinned in pyproject.toml: no torch.
RUN if [ "$CUDA" = "1" ]; then python -m pip install . "onnxruntime-gpu[cuda,cudnn]"; \
    else python -m pip install .; fi
ENV SERVING_HOST=0.0.0.0 \
    SERVING_PORT=50051 \
    SERVING_HTTP_PORT=8000 \
    SERVING_METRICS_PORT=9464 \
    SERVING_BUNDLE=/models/bundle
# Mount the bundle folder written by `trainer export` (or `trainer run`'s bundle/) here, read-only.
VOLUME ["/models"]
USER 10001:10001
# gRPC, HTTP/REST (the Open Inference Protocol's /v2 routes, a page at /) and /metrics.
EXPOSE 50051 8000 9464
# Asks the standard grpc.health.v1 service on SERVING_PORT: healthy only once the model is warm,
# unhealthy while it drains.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["serving", "health"]
ENTRYPOINT ["serving", "serve"]


FROM serving AS serving-baked
# Optional: a self-contained image with the bundle inside, for registries that deploy one artefact.
# BUNDLE is a folder of the build context; .dockerignore lets in only bundle/ (git ignores it):
#   cp -r runs/x/bundle bundle && docker build --target serving-baked -t lesson2/serving:0.1.0-x .
ARG BUNDLE=bundle
COPY --chown=10001:10001 ${BUNDLE}/ /models/bundle/


FROM base AS trainer
COPY pyproject.toml README.md ./
COPY serving/ serving/
COPY trainer/ trainer/
# DL3013 asks for pinned versions: they are pinned in pyproject.toml, which this installs.
# hadolint ignore=DL3013
RUN python -m pip install ".[train]" \
    && mkdir /runs && chown 10001:10001 /runs
# Caches (precompute, matplotlib) go under HOME: /tmp lets any uid write them, `docker run --user` too.
ENV HOME=/tmp
USER 10001:10001
# The dataset (train/ and valid/ folders, or a labels.csv) is mounted read-only at /data; the run
# folder, with its bundle/, is written to the volume at /runs (a new named volume takes its owner, 10001).
VOLUME ["/runs"]
ENTRYPOINT ["trainer"]
CMD ["run", "--data", "/data", "--out", "/runs/run"]
