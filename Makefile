PYTHON ?= python3
# The CPU wheel of torch: an unpinned torch would pull several GB of CUDA packages on a machine without a GPU.
TORCH_CPU ?= torch==2.13.0

.PHONY: install test demo bench convergence

# With the deepspeed extra (an sdist that builds without torch: no CUDA download), so its tests run in CI.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_CPU)"
	$(PYTHON) -m pip install -q -e ".[test,deepspeed]"

test: install
	$(PYTHON) -m pytest -q tests

# The embedded default: a small Llama built from a config, a local tokenizer and generated data, trained
# with BAdam and with AdamW on CPU; writes demo_report/ (loss.png, report.md, results.json).
demo: install
	$(PYTHON) -m badam_hf.demo --out demo_report

# Speed and memory of BAdam vs AdamW, LoRA and the authors' package, each method in its own process;
# writes benchmarks/results/<shape>/. On a GPU: make bench BENCH_ARGS="--shape llama3-8b".
bench: install
	$(PYTHON) benchmarks/bench.py $(BENCH_ARGS)

# BAdam vs AdamW vs LoRA loss curves on ../shared/data/alpaca_en_demo.json; writes benchmarks/results/convergence/
convergence: install
	$(PYTHON) benchmarks/convergence.py $(CONVERGENCE_ARGS)
