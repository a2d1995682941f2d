# The two commands of the README. Each creates .venv on first use and installs everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so a CPU-only machine never resolves a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,serve,demo]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check mtnlg tests benchmarks

demo: $(STAMP)
	mkdir -p $(DEMO_DIR)
	$(PY) -m mtnlg info --preset tiny
	$(PY) -m mtnlg info --preset mt-nlg-530b

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
