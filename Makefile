# The two commands of the quickstart. Both create (or reuse) .venv and install the project into it.
#   make demo   run the main job on the embedded default (synthetic data, CPU, configs/tiny.yaml)
#   make test   run the test suite
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev,depth]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/g3dr config --config configs/tiny.yaml --save outputs/demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf outputs build *.egg-info .pytest_cache
