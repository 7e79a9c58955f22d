# C++/CUDA extension targets; the Makefile includes mk/*.mk.
#   make cuda-check  compile the raw CUDA kernels (csrc/cuda/*.cu, no torch headers) with nvcc -c
#                    for sm_80 and sm_90
#   make cuda-ext    build the whole CUDAExtension (cersa_kernels._C + _C_cuda) against a CUDA
#                    build of torch in a throw-away venv (.venv-cuda, ~5.5 GB from local disk),
#                    then load it and check that the cersa:: ops have CUDA kernels
#   make cuda-ext-clean  remove that venv and its build folder
CUDA_HOME   ?= /usr/local/cuda-13.0
NVCC        ?= $(CUDA_HOME)/bin/nvcc
CUDA_ARCHS  ?= 80 90
CUDA_TORCH  ?= torch==2.14.1
CUDA_VENV   ?= .venv-cuda
CUDA_BUILD  ?= build/cuda-ext
CU_SOURCES  := $(wildcard csrc/cuda/*.cu)
PY          ?= python3

.PHONY: cuda-check cuda-ext cuda-ext-clean

cuda-check:
	@test -x $(NVCC) || { echo "cuda-check: no nvcc at $(NVCC) (set CUDA_HOME)"; exit 1; }
	@mkdir -p build/cuda-check
	@for f in $(CU_SOURCES); do \
	  echo "nvcc -c $$f (sm_$(firstword $(CUDA_ARCHS)) .. sm_$(lastword $(CUDA_ARCHS)))"; \
	  $(NVCC) -c -O3 -std=c++17 $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) \
	    -Xcompiler -Wall,-Werror $$f -o build/cuda-check/$$(basename $$f .cu).o || exit 1; \
	done
	@echo "cuda-check: OK"

cuda-ext:
	@test -x $(NVCC) || { echo "cuda-ext: no nvcc at $(NVCC) (set CUDA_HOME)"; exit 1; }
	test -x $(CUDA_VENV)/bin/python || $(PY) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(CUDA_VENV)/bin/python -m pip install -q $(CUDA_TORCH) ninja numpy
	rm -rf $(CUDA_BUILD)
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="8.0;9.0" CERSA_BUILD_CUDA=1 MAX_JOBS=2 \
	  $(CUDA_VENV)/bin/python setup.py -q build_ext --build-lib $(CUDA_BUILD)/lib --build-temp $(CUDA_BUILD)/tmp
	$(CUDA_VENV)/bin/python scripts/check_cuda_ext.py $(CUDA_BUILD)/lib/cersa_kernels

cuda-ext-clean:
	rm -rf $(CUDA_VENV) $(CUDA_BUILD) build/cuda-check
