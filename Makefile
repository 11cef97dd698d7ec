# medflow: `make test` for maintainers, `make demo` for newcomers, `make bench` for numbers.
# A virtualenv in .venv is created on first use. Where no torch is installed yet, the
# CPU wheel ($(TORCH_SPEC)) is installed first so pip does not pull a multi-GB CUDA build;
# override, e.g. `make install TORCH_SPEC="torch==2.5.1"`, to choose another build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo
BENCH_ARGS ?=

.PHONY: install test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $@

test: install
	$(PY) -m pytest

demo: install
	$(VENV)/bin/medflow demo --out $(DEMO_DIR)

bench: install
	$(PY) -m medflow.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
