PYTHON ?= python

.PHONY: install test lint format bench compile-check gpu-check

install:
	$(PYTHON) -m pip install -e ".[test]"

test:
	$(PYTHON) -m pytest -q -n auto

lint:
	$(PYTHON) -m ruff check mixlora_kernels tests examples
	$(PYTHON) -m ruff format --check mixlora_kernels tests examples

format:
	$(PYTHON) -m ruff check --fix mixlora_kernels tests examples
	$(PYTHON) -m ruff format mixlora_kernels tests examples

bench:
	$(PYTHON) -m mixlora_kernels.bench

# The GPU measurement in one command, from the checkout without installing: GPU tests,
# benchmark, stages, plots and a summary under $(OUT). GPU_CHECK_FLAGS=--small runs it
# at tiny shapes (CPU too).
OUT ?= gpu-check-results
gpu-check:
	PYTHONPATH=. $(PYTHON) -m mixlora_kernels.bench.gpu_check --out $(OUT) $(GPU_CHECK_FLAGS)

compile-check:
	$(PYTHON) -m mixlora_kernels.tuning.compile_check --arch sm_80,sm_86,sm_89,sm_90
