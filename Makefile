# Everything a fresh clone needs: `make demo`, `make test`, `make bench` (and bench-save / bench-compare).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On machines without a GPU this pin resolves to the CPU build kept on local disk;
# on a GPU machine override it, e.g. `make test TORCH=torch`.
TORCH ?= torch==2.13.0
# The demo's model is tiny: extra threads buy little, and on a busy machine torch's spinning OpenMP threads wait
# on descheduled siblings (2 threads beside one busy process: 5 min instead of 71 s on a 2-core box). One by
# default; `make demo DEMO_THREADS=8` on an idle many-core machine.
DEMO_THREADS ?= 1
DEMO_ENV := OMP_NUM_THREADS=$(DEMO_THREADS) MKL_NUM_THREADS=$(DEMO_THREADS)
# Ratio regression check (bench/compare.py): the saved run, and how much worse a ratio may get (0.10 = 10%).
BENCH_BASELINE ?= .benchmarks/peft_fast_baseline.json
BENCH_THRESHOLD ?= 0.10
BENCH_LATEST := bench/results/latest.json
# More pytest arguments for the bench targets, e.g. BENCH_ARGS="-k decode" or "--pf-charts bench/results/charts".
BENCH_ARGS ?=

# `make test-lowest`: the suite on the lowest torch, triton, transformers and safetensors pyproject.toml allows
# (.ci/lowest.txt; torch 2.11 with triton 3.6 is also the GPU machine's pair, here a CUDA build run on the CPU),
# in its own venv, so that those lower bounds are tested rather than claimed.
LOWEST_VENV ?= .venv-lowest

.PHONY: setup demo test test-lowest bench bench-save bench-compare clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(DEMO_ENV) $(PY) examples/demo.py
	$(DEMO_ENV) $(PY) examples/qlora_demo.py

test: setup
	$(VENV)/bin/pytest tests -q

$(LOWEST_VENV)/.installed: pyproject.toml .ci/lowest.txt
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOWEST_VENV)/bin/python -m pip install -q -c .ci/lowest.txt torch numpy
	$(LOWEST_VENV)/bin/python -m pip install -q -c .ci/lowest.txt -e ".[test]"
	touch $@

test-lowest: $(LOWEST_VENV)/.installed
	$(LOWEST_VENV)/bin/python -c "import torch, triton, transformers, safetensors; print('lowest:', *(f'{m.__name__} {m.__version__}' for m in (torch, triton, transformers, safetensors)))"
	$(LOWEST_VENV)/bin/pytest tests -q

bench: setup
	$(VENV)/bin/pytest bench -q $(BENCH_ARGS)

# Save this run as the reference: pytest-benchmark's autosave (raw times, .benchmarks/) plus our rows.
bench-save: setup
	$(VENV)/bin/pytest bench -q --pf-json $(BENCH_LATEST) --benchmark-autosave $(BENCH_ARGS)
	mkdir -p $(dir $(BENCH_BASELINE))
	cp $(BENCH_LATEST) $(BENCH_BASELINE)
	@echo "saved $(BENCH_BASELINE): make bench-compare judges later runs against its ratios"

# Run again and judge: pytest-benchmark's --benchmark-compare prints the raw times next to the last autosave (for
# reading: they move with the machine); bench/compare.py decides, on the ratios, and exits 1 on a regression.
bench-compare: setup
	@test -f $(BENCH_BASELINE) || { echo "no saved run at $(BENCH_BASELINE): run make bench-save first" >&2; exit 2; }
	$(VENV)/bin/pytest bench -q --pf-json $(BENCH_LATEST) --benchmark-compare $(BENCH_ARGS)
	$(PY) bench/compare.py $(BENCH_BASELINE) $(BENCH_LATEST) --threshold $(BENCH_THRESHOLD)

clean:
	rm -rf $(VENV) $(LOWEST_VENV) examples/out .pytest_cache .benchmarks
