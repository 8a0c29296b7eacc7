# fer-sweep: the user-facing verbs. Each calls `python -m orchestrator` or `python -m trainers`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SWEEP  ?= sweeps/demo.yaml
# Extra arguments for the verb, e.g. `make promote ARGS=--replace`, `make production ARGS="--runs all"`.
ARGS   ?=
# `make ui` binds loopback; only the command line (make ui HOST=...) changes it, not an exported HOST
# (some shells and CI images export HOST as the machine's name, which would open the UI to the network).
HOST   := 127.0.0.1
PORT   := 5000
export HF_HUB_OFFLINE ?= 1

.PHONY: setup sweep plan test bench ui promote production report serve up down clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

sweep: $(STAMP)
	$(PY) -m orchestrator sweep $(SWEEP)

plan: $(STAMP)
	$(PY) -m orchestrator plan $(SWEEP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pytest -q -s tests/bench

ui: $(STAMP)
	@echo "MLflow UI: http://$(HOST):$(PORT)/#/experiments?workflowType=machine_learning (sweep, report, promote and production print links to a sweep's runs)"
	MLFLOW_DISABLE_TELEMETRY=$${MLFLOW_DISABLE_TELEMETRY:-true} $(PY) -m mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host $(HOST) --port $(PORT)

promote: $(STAMP)
	$(PY) -m orchestrator promote $(SWEEP) $(ARGS)

production: $(STAMP)
	$(PY) -m orchestrator production $(SWEEP) $(ARGS)

report: $(STAMP)
	$(PY) -m orchestrator report $(SWEEP)

# `mlflow models serve` of the champion on 127.0.0.1:5001 (make serve PORT=8080 for another port; 5000 is the UI's).
serve: $(STAMP)
	$(PY) -m orchestrator serve $(SWEEP) --host $(HOST) --port $(if $(filter command line,$(origin PORT)),$(PORT),5001) $(ARGS)

up:
	@test -f docker/.env || { echo "docker/.env is missing: cp docker/env.example docker/.env, then set its password"; exit 2; }
	docker compose -f docker/compose.yaml --env-file docker/.env up -d --build

down:
	docker compose -f docker/compose.yaml --env-file docker/.env down

clean:
	rm -rf $(VENV) .pytest_cache
