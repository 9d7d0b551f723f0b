# The two commands a new user needs:
#   make demo   install, start a local Kafka, run examples/demo.py (immediate, delayed and
#               priority messages end to end), print a summary
#   make test   install, run the whole test suite (it starts its own Kafka and Ray)
PYTHON ?= python3
KAFKA_LOCAL := deploy/kafka/kafka-local

.PHONY: setup demo test test-unit reliability lint typecheck bench kafka-start kafka-stop

setup:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(KAFKA_LOCAL) fetch
	@command -v kcat >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q kcat >/dev/null \
	      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q kcat >/dev/null; }; \
	  else echo "kcat is missing: sudo apt-get install kcat (the interoperability test needs it)"; exit 1; fi; }

demo: setup
	$(PYTHON) examples/demo.py

test: setup
	$(PYTHON) -m pytest

test-unit: setup
	$(PYTHON) -m pytest tests/unit

# The fault suite (RELIABILITY.md): a 3-broker Kafka and a 3-node Ray cluster of its own,
# about an hour; figures under tests/reliability/results, as a table:
# python tests/reliability/results.py
reliability: setup
	$(PYTHON) -m pytest tests/reliability -v -s

lint:
	$(PYTHON) -m ruff check .
	.ci/layers

typecheck:
	.ci/typecheck

BENCH_JSON = bench_publish bench_priority bench_delay bench_out_of_order bench_datasink bench_memory
BENCH_PLAIN = bench_pipeline bench_telemetry

bench: setup
	mkdir -p benchmarks/results
	cd benchmarks && for b in $(BENCH_JSON); do \
	  $(PYTHON) $$b.py --json results/$$b.json || exit 1; done
	cd benchmarks && $(PYTHON) bench_priority.py --floor --json results/bench_priority_floor.json
	cd benchmarks && for b in $(BENCH_PLAIN); do $(PYTHON) $$b.py || exit 1; done
	$(PYTHON) benchmarks/plots.py --publish benchmarks/results/bench_publish.json \
	  --priority benchmarks/results/bench_priority.json \
	  --delay benchmarks/results/bench_delay.json

kafka-start:
	$(KAFKA_LOCAL) start

kafka-stop:
	$(KAFKA_LOCAL) stop
