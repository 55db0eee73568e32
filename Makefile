# Everything a fresh clone needs: `make demo`, `make test`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On machines without a GPU this pin resolves to the CPU build kept on local disk;
# on a GPU machine override it, e.g. `make test TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(PY) examples/demo.py
	$(PY) examples/qlora_demo.py

test: setup
	$(VENV)/bin/pytest tests -q

bench: setup
	$(VENV)/bin/pytest bench -q

clean:
	rm -rf $(VENV) examples/out .pytest_cache .benchmarks
