.PHONY: help setup demo test test-fast lint format kafka-start kafka-stop bench

help:            ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup:           ## create .venv, install the project and dev tools, fetch the Kafka jars
	scripts/setup.sh

demo:            ## run the local demo: broker, worker, simulated API nodes, live usage
	scripts/demo.sh

test:            ## the whole test suite against a real Kafka broker and chDB (what CI runs)
	scripts/test.sh

test-fast:       ## unit tests only (no broker needed)
	scripts/setup.sh && .venv/bin/pytest tests/unit -q

lint:            ## ruff + mypy
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

format:          ## apply ruff formatting and safe fixes
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .

kafka-start:     ## start the local KRaft broker on 127.0.0.1:9092
	infra/kafka/kafka.sh start

kafka-stop:      ## stop the local broker
	infra/kafka/kafka.sh stop

bench:           ## run the benchmarks in bench/ (writes bench/results.md)
	.venv/bin/python bench/ingest.py
