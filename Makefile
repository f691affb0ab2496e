# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv if missing, install the pinned torch and the tools, and build the extension.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
DEPS := $(VENV)/.deps-$(TORCH_VERSION)
BUILT := $(VENV)/.built
CPP_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
NVCC ?= $(shell command -v nvcc 2>/dev/null)
export MAX_JOBS ?= 2

.PHONY: demo test build lint format cuda-check bench clean

demo: $(BUILT)
	$(PY) benchmarks/speed.py

test: lint cuda-check $(BUILT)
	$(PY) -m pytest tests

build: $(BUILT)

$(DEPS):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q setuptools wheel ninja numpy pytest hypothesis expecttest tqdm ruff clang-format
	touch $@

# --no-build-isolation: build against the torch installed above, not a second one.
$(BUILT): $(DEPS) setup.py pyproject.toml $(CPP_SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

lint: $(DEPS)
	$(VENV)/bin/ruff check nanomoe tests benchmarks setup.py
	$(VENV)/bin/ruff format --check nanomoe tests benchmarks setup.py
	$(VENV)/bin/clang-format --dry-run --Werror $(filter %.cpp %.h %.cu %.cuh,$(CPP_SOURCES))

format: $(DEPS)
	$(VENV)/bin/ruff format nanomoe tests benchmarks setup.py
	$(VENV)/bin/ruff check --fix nanomoe tests benchmarks setup.py
	$(VENV)/bin/clang-format -i $(filter %.cpp %.h %.cu %.cuh,$(CPP_SOURCES))

# Compile-only check of every CUDA kernel for sm_80 and sm_90, so CUDA code never rots on machines
# without a GPU. The kernels include only CUDA headers, so no CUDA build of torch is needed.
cuda-check:
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: no nvcc, skipped"; exit 0; fi; \
	files=$$(find csrc/cuda -name '*.cu' 2>/dev/null); \
	if [ -z "$$files" ]; then echo "cuda-check: no .cu files yet"; exit 0; fi; \
	for f in $$files; do \
	  echo "nvcc $$f (sm_80, sm_90)"; \
	  $(NVCC) -std=c++17 -O3 -Icsrc -gencode arch=compute_80,code=sm_80 \
	    -gencode arch=compute_90,code=sm_90 -c $$f -o /dev/null || exit 1; \
	done

bench: $(BUILT)
	$(PY) benchmarks/speed.py

clean:
	rm -rf build *.egg-info nanomoe/*.so $(BUILT)
