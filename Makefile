# streametl: the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
# The interpreter .venv is built from: the distribution's optimized CPython when it can
# make a venv, else python3 (why: deploy/pick-python.sh). Override: make PY=python3.12
PY ?= $(shell deploy/pick-python.sh)
VENV := .venv
BIN := $(VENV)/bin
KAFKA := deploy/kafka/kafka.sh
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

.PHONY: run worker test test-unit lint schema kafka-start kafka-stop kafka-status bench install clean

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

## test: venv + Kafka + every test tier; stops the broker it started
test: $(STAMP)
	@started=0; \
	if ! $(KAFKA) status >/dev/null 2>&1; then $(KAFKA) start && started=1; fi; \
	$(BIN)/python -m pytest $(TESTS) $(PYTEST_ARGS); rc=$$?; \
	if [ $$started = 1 ]; then $(KAFKA) stop; fi; \
	exit $$rc

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
