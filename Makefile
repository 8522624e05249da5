# One command for the main job, one for the tests; each creates the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_ROOT ?=
ARGS ?=

.PHONY: install train test test-fast lint docs bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

## Fine-tune on Penn-Fudan (downloads it; offline: make train DATA_ROOT=/path/to/PennFudanPed)
train: install
	$(VENV)/bin/detfit train $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(ARGS)

## The whole test suite (real-data tests run when ../shared/data/PennFudanPed exists), in two
## worker processes (each test file in one of them), since every test runs torch on one thread
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

## Everything but the slow real-data tests
test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks

## The documentation site (docs/, mkdocs.yml) into site/; warnings are errors
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) build dist site src/*.egg-info .pytest_cache .ruff_cache
