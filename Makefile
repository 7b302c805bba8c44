.PHONY: help setup demo test test-fast lint format kafka-start kafka-stop bench bench-queries

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

lint:            ## ruff + mypy + import contracts (lint-imports)
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy && .venv/bin/lint-imports

format:          ## apply ruff formatting and safe fixes
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .

kafka-start:     ## start the local KRaft broker on 127.0.0.1:9092
	infra/kafka/kafka.sh start

kafka-stop:      ## stop the local broker
	infra/kafka/kafka.sh stop

bench:           ## run the ingest, decisions and memory benchmarks (write bench/results.md; broker on 9092)
	infra/kafka/kafka.sh start
	.venv/bin/python -m bench.ingest
	.venv/bin/python -m bench.decisions
	.venv/bin/python -m bench.memory

bench-queries:   ## the query benchmark (seeds 1M keys x 30 days into chDB first: ~12 minutes)
	.venv/bin/python -m bench.queries
