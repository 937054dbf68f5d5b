# Two commands for a newcomer: `make demo` and `make test`. Both build .venv when missing.
PYTHON ?= python3
VENV ?= .venv
# Override for CUDA / Jetson, e.g. make test TORCH_SPEC="torch==2.5.0"
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= ml,quant,onnx,dev,postgres
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cotune demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) bench/transport.py --quick

clean:
	rm -rf $(VENV) build *.egg-info
