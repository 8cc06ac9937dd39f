PYTHON ?= python

.PHONY: install test lint format bench compile-check

install:
	$(PYTHON) -m pip install -e ".[test]"

test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check mixlora_kernels reference tests bench examples
	$(PYTHON) -m ruff format --check mixlora_kernels reference tests bench examples

format:
	$(PYTHON) -m ruff check --fix mixlora_kernels reference tests bench examples
	$(PYTHON) -m ruff format mixlora_kernels reference tests bench examples

bench:
	$(PYTHON) -m bench

compile-check:
	$(PYTHON) -m mixlora_kernels.tuning.compile_check --arch sm_80,sm_86,sm_89,sm_90
