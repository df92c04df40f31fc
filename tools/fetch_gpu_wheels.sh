#!/bin/bash
# Download the wheels the GPU benchmark host lacks into .whl/ (ignored by git; travels with the working tree,
# <= 64 MiB). That host has Python 3.12, torch 2.11 (CUDA 13), triton 3.6, transformers 5.17 (with its pyyaml, tqdm,
# safetensors, tokenizers), numpy and pytest, and no package index; tools/gpu_check.sh installs these with
# `pip install --no-index --no-deps --target`.
#
#   megatron-core 0.16.1   the model and parallel layer (2.6 MB cp312 wheel)
#   psutil                 the trainer's host-memory metric
#   pillow                 the image pipeline of the tiny SFT run (data.image_pipeline=pil; DALI does not fit)
#   pytest-timeout         pytest.ini sets `timeout`
# Not carried (too big or not needed for the check): Transformer Engine, vLLM, DALI, flash-attn, math-verify.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
$PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl megatron-core==0.16.1 psutil==7.2.2 pillow==13.0.0 pytest-timeout==2.4.0
du -sh .whl
ls -1 .whl
