# `make test` and `make bench` set up a fresh machine, then run.
# If python3 already has torch (e.g. the GPU machine), it is used as is and nothing is
# downloaded; otherwise a .venv gets torch 2.13.0 (CPU), served by the local index.
SHELL := /bin/bash
HAVE_TORCH := $(shell python3 -c "import torch" >/dev/null 2>&1 && echo yes)
ifeq ($(HAVE_TORCH),yes)
PY := python3
else
PY := $(CURDIR)/.venv/bin/python
endif
SIZE ?= small
BENCH_ARGS ?=
# The results of `make bench`, and its plot beside them (same name, .png).
BENCH_JSON ?= bench_out/bench-$(SIZE).json
PYTEST_ARGS ?=

.PHONY: setup build test bench cpptest cudahosttest clean

# matplotlib (the [bench] extra: `make bench`'s plot), accelerate (a patch_torch test),
# hypothesis (the ops' property tests), transformers (save_pretrained of tied models) and
# torchtitan (its CheckpointManager with our stager; --no-deps: only its checkpoint
# component is used, and its full dependencies pull wandb, datasets, ...) are optional:
# where no package index answers, they are skipped, not fatal; a python3 that has torch
# already (the GPU machine) downloads nothing for them.
setup:
ifneq ($(HAVE_TORCH),yes)
	@test -x .venv/bin/python || python3 -m venv .venv
	@.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
	@.venv/bin/pip install -q pybind11 ninja pytest setuptools wheel packaging numpy
	@$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q --retries 1 --timeout 10 matplotlib \
	  || echo "matplotlib not installed: make bench writes no plot"
	@$(PY) -c "import accelerate" 2>/dev/null || $(PY) -m pip install -q --retries 1 --timeout 10 accelerate \
	  || echo "accelerate not installed: its patch_torch test is skipped"
	@$(PY) -c "import hypothesis" 2>/dev/null || $(PY) -m pip install -q --retries 1 --timeout 10 hypothesis \
	  || echo "hypothesis not installed: the ops' property tests are skipped"
	@$(PY) -c "import transformers" 2>/dev/null || $(PY) -m pip install -q --retries 1 --timeout 10 transformers \
	  || echo "transformers not installed: its save_pretrained tests are skipped"
	@$(PY) -c "import torchtitan.components.checkpoint" 2>/dev/null || ( \
	  $(PY) -m pip install -q --retries 1 --timeout 10 tyro einops \
	  && $(PY) -m pip install -q --retries 1 --timeout 10 --no-deps torchtitan==0.3.0 ) \
	  || echo "torchtitan not installed: its CheckpointManager test is skipped"
endif
# A python3 that has torch (the GPU machine, often without network) needs nothing more
# to build: without ninja the build is slower, without pytest only `make test` fails.
# So a pip that reaches no index is reported, not fatal.
	@$(PY) -c "import pytest, ninja" 2>/dev/null || $(PY) -m pip install -q --retries 1 --timeout 10 pytest ninja \
	  || echo "pytest / ninja not installed (no package index?): building without ninja is slower"

build: setup
	$(PY) setup.py -q build_ext --inplace -j 2

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: build
	@mkdir -p $(dir $(BENCH_JSON))
	$(PY) -m bench --size $(SIZE) --json $(BENCH_JSON) $(BENCH_ARGS)

# C++ unit tests of the CPU kernels through CMake/ctest; SANITIZE=ON for ASan+UBSan.
SANITIZE ?= OFF
cpptest: setup
	cmake -S . -B build/cmake-$(SANITIZE) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSDICT_EXT_SANITIZE=$(SANITIZE) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake-$(SANITIZE) -j 2
	cd build/cmake-$(SANITIZE) && ctest --output-on-failure

# The CUDA copy kernel's indexing, emulated on the CPU (no GPU needed, nvcc is): the
# table built by the real code, every chunk run thread by thread, under ASan+UBSan.
NVCC ?= nvcc
CUDA_HOST_FLAGS := -std=c++17 -arch=sm_90 -g -I csrc/include $(foreach f,-fsanitize=address \
  -fsanitize=undefined -fno-sanitize-recover=all -fno-omit-frame-pointer,-Xcompiler $(f))
cudahosttest:
	@mkdir -p build/cuda-host
	$(NVCC) $(CUDA_HOST_FLAGS) tests/cuda_host/test_copy_kernel.cu -o build/cuda-host/test_copy_kernel
	build/cuda-host/test_copy_kernel

clean:
	rm -rf build sdict_ext/_C*.so
