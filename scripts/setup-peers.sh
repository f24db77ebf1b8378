#!/usr/bin/env bash
# A separate virtual env (.venv-peers) with the peer loaders that need another torch than lowbit's pin:
# GPTQModel (transformers' backend for GPTQ and AWQ checkpoints; it requires torch 2.14) and optimum.
# The interop tests run our exports through it in a subprocess; the project's .venv stays on torch 2.13.
# Idempotent; installed with uv (scripts/uv.sh), which links the CUDA libraries of torch's wheel from its cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv-peers/bin/python ] || "$PYTHON" -m venv --without-pip .venv-peers
. scripts/uv.sh
BUILD_CUDA_EXT=0 uv_install .venv-peers/bin/python torch==2.14.1 gptqmodel==7.7.0 optimum==2.3.0 transformers==5.24.0 accelerate==1.15.0 \
    safetensors==0.8.0 psutil==7.2.2 tqdm==4.70.1
