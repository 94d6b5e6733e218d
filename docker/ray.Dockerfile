# syntax=docker/dockerfile:1
# Ray head, GPU workers and Serve replicas: Ray, the GPU build of torch, DeepSpeed, transformers and
# the project's ml/ + serve/ code (training entrypoint, batched Serve app).
#
#   docker build -f docker/ray.Dockerfile -t ct-ray .                          (GPU, from the repo root)
#   docker build -f docker/ray.Dockerfile --build-arg VARIANT=cpu -t ct-ray:cpu .
ARG RAY_VERSION=2.60.0
# gpu: Ray's CUDA image + torch from TORCH_CUDA's wheel index; cpu: Ray's CPU image + CPU torch
ARG VARIANT=gpu
FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}
ARG VARIANT
ARG TORCH_VERSION=2.13.0
# A CUDA build published for TORCH_VERSION (https://download.pytorch.org/whl/torch/); the wheels
# bring their CUDA libraries, the host needs only the NVIDIA driver + container toolkit.
ARG TORCH_CUDA=cu128

# DeepSpeed JIT-compiles a small C++ op for CPU communication on first use: it needs a compiler.
USER 0
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
# the base image's non-root user `ray`
USER 1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# torch first, from the wheel index of the variant, so the pins below keep it instead of pulling
# another build; then the rest, pinned by requirements.txt (docker/requirements-ray.txt is generated
# from it) and resolved with the project's constraints.txt.
RUN index="https://download.pytorch.org/whl/$([[ "$VARIANT" == cpu ]] && echo cpu || echo "$TORCH_CUDA")" \
    && pip install --no-cache-dir --index-url "$index" "torch==${TORCH_VERSION}"
COPY --chown=ray:users constraints.txt docker/requirements-ray.txt /home/ray/ct/
RUN pip install --no-cache-dir -r /home/ray/ct/requirements-ray.txt -c /home/ray/ct/constraints.txt \
    && python -c "import torch, deepspeed, transformers; print('torch', torch.__version__)"

# The code last. Ray workers inherit the environment of `ray start`, so jobs (`python -m ml.train`)
# and the Serve app (`serve.app:classifier_app`) import it from here.
ENV PYTHONPATH=/home/ray/ct/src \
    HF_HUB_OFFLINE=1
COPY --chown=ray:users ml /home/ray/ct/src/ml
COPY --chown=ray:users serve /home/ray/ct/src/serve
WORKDIR /home/ray
