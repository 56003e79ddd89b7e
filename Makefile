# streamrec: `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch first, pinned: the CPU wheel of exactly this version is what we want.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[embedded,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

.PHONY: help install demo test test-fast lint schemas bench clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv with streamrec and its dev/embedded extras

demo: $(STAMP) ## run the whole system on the embedded stack for a minute and show it learning
	STREAMREC_JOINER_WINDOW_S=5 STREAMREC_JOINER_LATENESS_S=2 \
	STREAMREC_EMBEDDINGS_PUBLISH_INTERVAL_S=5 STREAMREC_DRN_MAJOR_INTERVAL_S=5 \
	$(PY) -m services.cli up --run-dir .streamrec/demo --simulate --duration 60 --rate 200

test: $(STAMP) ## the whole suite: unit, doctests and integration tests on real Kafka/Redis
	$(PY) -m pytest -q

test-fast: $(STAMP) ## unit tests and doctests only (no broker, no Redis)
	$(PY) -m pytest -q -m "not integration" tests/unit services contracts

lint: $(STAMP) ## ruff, and mypy on the contracts and learners
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

schemas: $(STAMP) ## regenerate contracts/schemas/*.json from the event types
	$(PY) -m services.cli schemas

bench: $(STAMP) ## run the benchmarks (JSON to benchmarks/results/)
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/bandits.py
	$(PY) benchmarks/sequences.py

clean: ## remove the virtualenv and run state
	rm -rf $(VENV) .streamrec .pytest_cache
