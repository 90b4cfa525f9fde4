# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= out

.PHONY: demo test install lint bench clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: it is the local CPU build; a bare "torch" would pull the CUDA one.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nmopt demo --out $(OUT)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 -q

lint: $(STAMP)
	$(VENV)/bin/ruff check nmopt solvers backends tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info $(OUT)
