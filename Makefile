# streametl: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
# The interpreter .venv is built from: the distribution's optimized CPython when it can
# make a venv, else python3 (why: deploy/pick-python.sh). Override: make PY=python3.12
PY ?= $(shell deploy/pick-python.sh)
VENV := .venv
BIN := $(VENV)/bin
KAFKA := deploy/kafka/kafka.sh
PG := deploy/postgres/postgres.sh
STAMP := $(VENV)/.installed
# Tiers to run; CI runs them all.
TESTS ?= tests/unit tests/integration tests/chaos
PYTEST_ARGS ?=
# The broker `make test` starts (or finds) and that the tests talk to.
KAFKA_PORT ?= 9092
export KAFKA_PORT
export STREAMETL_TEST_BOOTSTRAP ?= 127.0.0.1:$(KAFKA_PORT)
# The broker `make run` and `make worker` connect to: the one kafka-start answers on.
export STREAMETL_BROKER ?= kafka://127.0.0.1:$(KAFKA_PORT)
# The PostgreSQL `make test` starts (or finds) for the database sink tests.
PG_PORT ?= 5433
export PG_PORT
export STREAMETL_TEST_POSTGRES_DSN ?= postgresql://postgres@127.0.0.1:$(PG_PORT)/streametl

.PHONY: run worker test test-unit lint schema kafka-start kafka-stop kafka-status bench install clean browser postgres-start postgres-stop

$(STAMP): pyproject.toml
	@py="$(PY)"; echo "building $(VENV) from $$py ($$($$py -c 'import sys; print(sys.version.split()[0])'))"; \
	  $$py -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

kafka-start: $(STAMP)
	$(KAFKA) start

kafka-stop:
	$(KAFKA) stop

kafka-status:
	$(KAFKA) status

## run: venv + Kafka (when none answers) + topics + one worker on :6066
run: kafka-start
	$(BIN)/streametl worker -l info

## worker: another worker in the same group, e.g. `make worker WEB_PORT=6067`
WEB_PORT ?= 6067
worker: $(STAMP)
	STREAMETL_DATA_DIR=$${STREAMETL_DATA_DIR:-.data/worker-$(WEB_PORT)} \
	  $(BIN)/streametl worker -l info --web-port $(WEB_PORT)

## browser: Debian's chromium, for the dashboard's browser test (installed once)
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium (browser test)"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "could not install chromium: tests/integration/test_dashboard.py will fail"; }

## test: venv + Kafka + PostgreSQL + chromium + every test tier; stops what it started
test: $(STAMP) browser
	@started=0; pg_started=0; \
	if ! $(KAFKA) status >/dev/null 2>&1; then $(KAFKA) start && started=1; fi; \
	if ! $(PG) status >/dev/null 2>&1; then $(PG) start && pg_started=1; fi; \
	$(BIN)/python -m pytest $(TESTS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$started = 1 ]; then $(KAFKA) stop; fi; \
	if [ $$pg_started = 1 ]; then $(PG) stop; fi; \
	exit $$rc

## postgres-start / postgres-stop: a local PostgreSQL on PG_PORT (5433) for database sinks
postgres-start:
	$(PG) start

postgres-stop:
	$(PG) stop

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check app agents tables web operators tests bench

## schema: rewrite docs/pipelines.schema.json (the config file's JSON Schema) from its models
schema: $(STAMP)
	$(BIN)/python -m app.models.config

## bench: e.g. `make bench SCENARIO=produce-http` (see bench/README.md)
SCENARIO ?= produce-http
bench: kafka-start
	$(BIN)/python -m bench $(SCENARIO) $(BENCH_ARGS)

clean:
	rm -rf .data
