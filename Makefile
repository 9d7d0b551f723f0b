# The two commands a new user needs:
#   make demo   install, start a local Kafka, run examples/demo.py (immediate, delayed and
#               priority messages end to end), print a summary
#   make test   install, run the whole test suite (it starts its own Kafka and Ray)
PYTHON ?= python3
KAFKA_LOCAL := deploy/kafka/kafka-local

.PHONY: setup demo test test-unit lint typecheck bench kafka-start kafka-stop

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

lint:
	$(PYTHON) -m ruff check .
	.ci/layers

typecheck:
	.ci/typecheck

bench: setup
	cd benchmarks && for b in bench_publish bench_delay bench_pipeline bench_telemetry; do \
	  $(PYTHON) $$b.py || exit 1; done

kafka-start:
	$(KAFKA_LOCAL) start

kafka-stop:
	$(KAFKA_LOCAL) stop
