PYTHON ?= python3
# The CPU wheel of torch: an unpinned torch would pull several GB of CUDA packages on a machine without a GPU.
TORCH_CPU ?= torch==2.13.0

.PHONY: install test

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_CPU)"
	$(PYTHON) -m pip install -q -e ".[test]"

test: install
	$(PYTHON) -m pytest -q tests
