# The README's commands. Each target sets up what it needs from nothing: venv, PyTorch, Triton, build.
#   make demo   prune a LLaVA-1.5-shaped batch, show the kept tokens and time every backend
#   make test   build, run the test suite (Triton kernels under TRITON_INTERPRET=1) and the CMake/ctest build
#   make triton-compile-check   compile every Triton kernel the GPU path launches, for sm_90, with the
#               venv's Triton and the GPU host's (no GPU needed)
#   make test-vllm  vLLM's CPU build in .venv-vllm with this package built against its torch, then tests/vllm_plugin
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
# CUDA kernels are compiled whenever a toolkit is found (no GPU needed); FOPRU_BUILD_CUDA=0 skips them.
export MAX_JOBS ?= 2
CSRC := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.h csrc/cuda/*.cuh csrc/cuda/*.cu)

.PHONY: demo test pytest build cmake-test bench clean triton-compile-check test-vllm

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" triton numpy ninja \
		"pytest>=8" "hypothesis>=6" "pytest-benchmark>=4" "pytest-timeout>=2" "matplotlib>=3.7" \
		"transformers>=5,<6"
	touch $@

fopru_kernels/_C.so: $(VENV)/.installed $(CSRC) setup.py
	$(PY) setup.py -q build_ext --inplace

build: fopru_kernels/_C.so

demo: build
	$(PY) -m fopru_kernels demo

pytest: build
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider tests

# The same sources against LibTorch via CMake, with the C++ test under ctest; the CUDA kernels are
# compiled too where nvcc is found (no GPU needed).
FOPRU_CMAKE_CUDA ?= $(if $(shell command -v nvcc),ON,OFF)
cmake-test: $(VENV)/.installed
	TORCH_CUDA_ARCH_LIST="8.0;9.0" cmake -S . -B cmake-build \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DCUDA_TOOLKIT_ROOT_DIR=/usr/local/cuda -DCUDAToolkit_ROOT=/usr/local/cuda \
		-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc \
		-DCUDA_nvrtc_LIBRARY="$$(ls $(VENV)/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.* | head -1)" \
		-DFOPRU_NVIDIA_INCLUDE="$$(realpath $$(ls -d $(VENV)/lib/python3*/site-packages/nvidia/cu13/include | head -1))" \
		-DFOPRU_CUDA=$(FOPRU_CMAKE_CUDA)
	cmake --build cmake-build -j$(MAX_JOBS)
	ctest --test-dir cmake-build --output-on-failure

test: pytest cmake-test

# The vLLM plugin's tests need vLLM's CPU build (torch 2.13.0), so they run in a venv of their own;
# scripts/vllm_env.sh makes it from nothing and installs this package into it (built there).
# Run from tests/vllm_plugin so the installed package, not the in-place build, is imported.
test-vllm:
	bash scripts/vllm_env.sh .venv-vllm
	cd tests/vllm_plugin && ../../.venv-vllm/bin/python -m pytest -q .

# scripts/triton_compile_check.py with the venv's Triton, then with the GPU host's Triton
# (TRITON_GPU_HOST), installed into a directory of its own and put first on PYTHONPATH, never into
# the venv. TRITON_COMPILE_ARCH=80 checks sm_80 instead of sm_90.
TRITON_GPU_HOST ?= 3.6.0
TRITON_COMPILE_ARCH ?= 90
TRITON_SIDE := .triton-$(TRITON_GPU_HOST)

$(TRITON_SIDE)/.installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --target $(TRITON_SIDE) "triton==$(TRITON_GPU_HOST)"
	touch $@

triton-compile-check: $(VENV)/.installed $(TRITON_SIDE)/.installed
	$(PY) scripts/triton_compile_check.py --arch $(TRITON_COMPILE_ARCH)
	PYTHONPATH=$(TRITON_SIDE) $(PY) scripts/triton_compile_check.py --arch $(TRITON_COMPILE_ARCH) \
		--expect-triton $(TRITON_GPU_HOST)

bench: build
	$(PY) -m pytest -q -p no:cacheprovider benchmarks --benchmark-only

clean:
	rm -rf build cmake-build fopru_kernels/_C.so
