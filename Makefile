# The two entry points of the README. Each one installs everything it needs first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup test bench lint gpu-check

setup:
	$(PIP) install -r requirements-dev.txt
	$(PIP) install --no-build-isolation -e .

# Triton kernels run under the interpreter in the main run; ahead-of-time compilation cannot
# run with the interpreter on, so it gets a process of its own.
test: setup
	TRITON_INTERPRET=1 $(PYTHON) -m pytest tests --ignore=tests/test_triton_aot.py
	$(PYTHON) -m pytest tests/test_triton_aot.py
	$(PYTHON) -m ruff check .

bench: setup
	$(PYTHON) -m dlkernels
	$(PYTHON) -m bench

lint:
	$(PYTHON) -m ruff check .

# On a machine with a CUDA GPU (no network needed): build for that GPU, run the GPU tests and a GPU
# benchmark; logs and JSON in $(RESULTS). Without a GPU it says so and exits 0.
RESULTS ?= bench/results
gpu-check:
	PYTHON=$(PYTHON) RESULTS=$(RESULTS) bench/gpu_check.sh
