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
	$(PY) -m pip install --quiet -e '.[dev,depth,generate,mesh,video]'
	@touch $(STAMP)

DEMO_DIR ?= outputs/demo

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/g3dr train --config configs/tiny.yaml run_dir=$(DEMO_DIR)
	@echo "demo done:"
	@echo "  checkpoints   $(DEMO_DIR)/checkpoints (continue with: $(VENV)/bin/g3dr train --config configs/tiny.yaml run_dir=$(DEMO_DIR) train.total_steps=40 --resume auto)"
	@echo "  f_trigen      $(DEMO_DIR)/f_trigen.safetensors (fp32)"
	@echo "  MLflow store  sqlite:///$(DEMO_DIR)/mlflow.db (view: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(DEMO_DIR)/mlflow.db)"

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf outputs build *.egg-info .pytest_cache
