# make run:  set up .venv and run the reference recipe (offline backbone) on ants/bees
# make test: set up .venv, lint, and run the tests
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA := ../shared/data/hymenoptera_data
# the shared copy of the dataset when there is one; otherwise the recipe downloads it
DATA := $(if $(wildcard $(SHARED_DATA)),--set dataset.root=$(SHARED_DATA))

.PHONY: run test lint

$(VENV)/.installed: pyproject.toml plugins/tlx-efficientnet-lite/pyproject.toml plugins/tlx-prototype-head/pyproject.toml \
		plugins/tlx-mlflow/pyproject.toml plugins/tlx-ray/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' -e plugins/tlx-efficientnet-lite \
		-e plugins/tlx-prototype-head -e plugins/tlx-mlflow -e 'plugins/tlx-ray[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/tlx run recipes/hymenoptera-lite0.yaml $(DATA)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest --durations=15
