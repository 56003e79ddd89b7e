# streamrec: `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The embedded Apache Kafka: pinned in deploy/kafka/pom.xml, jars cached outside the tree
# (services/stack/kafka.py looks in the same place).
KAFKA_VERSION := $(shell sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' deploy/kafka/pom.xml)
KAFKA_HOME := $(or $(STREAMREC_KAFKA_HOME),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/streamrec/kafka-$(KAFKA_VERSION))
KAFKA_STAMP := $(KAFKA_HOME)/.complete

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch first, pinned: the CPU wheel of exactly this version is what we want.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[embedded,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

$(KAFKA_STAMP): deploy/kafka/pom.xml
	@command -v java > /dev/null || { echo "Apache Kafka needs Java 17+: apt install openjdk-17-jre-headless (or run streamrec up --kafka HOST:PORT)" >&2; exit 1; }
	@command -v mvn > /dev/null || { echo "fetching Apache Kafka needs Maven: apt install maven (or run streamrec up --kafka HOST:PORT)" >&2; exit 1; }
	rm -rf $(KAFKA_HOME)/libs
	mvn --quiet --batch-mode -f deploy/kafka/pom.xml dependency:copy-dependencies -DoutputDirectory=$(KAFKA_HOME)/libs
	@touch $@

.PHONY: help install kafka demo test test-fast lint schemas bench clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP) $(KAFKA_STAMP) ## create .venv with streamrec and its dev/embedded extras, fetch Kafka

kafka: $(KAFKA_STAMP) ## fetch Apache Kafka's jars from Maven Central (once, into ~/.cache/streamrec)

demo: $(STAMP) $(KAFKA_STAMP) ## run the whole system on the embedded stack for a minute and show it learning
	STREAMREC_JOINER_WINDOW_S=5 STREAMREC_JOINER_LATENESS_S=2 \
	STREAMREC_EMBEDDINGS_PUBLISH_INTERVAL_S=5 STREAMREC_DRN_MAJOR_INTERVAL_S=5 \
	$(PY) -m services.cli up --run-dir .streamrec/demo --simulate --duration 60 --rate 200

test: $(STAMP) $(KAFKA_STAMP) ## the whole suite: unit, doctests and integration tests on real Kafka/Redis
	$(PY) -m pytest -q

test-fast: $(STAMP) ## unit tests and doctests only (no broker, no Redis, nothing slow)
	$(PY) -m pytest -q -m "not integration and not slow" tests/unit services contracts

lint: $(STAMP) ## ruff (lint and format), the package layers, mypy on the contracts and learners
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) scripts/check_layers.py
	$(VENV)/bin/mypy

schemas: $(STAMP) ## regenerate contracts/schemas/*.json from the event types
	$(PY) -m services.cli schemas

bench: $(STAMP) $(KAFKA_STAMP) ## run the benchmarks (JSON to benchmarks/results/)
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/bandits.py
	$(PY) benchmarks/sequences.py

clean: ## remove the virtualenv and run state (not the Kafka jars in ~/.cache/streamrec)
	rm -rf $(VENV) .streamrec .pytest_cache
