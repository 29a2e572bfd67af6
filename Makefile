# `make run` and `make test` each set up what they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)

.PHONY: setup run test bench clean

$(STAMP): requirements.txt requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c requirements.lock
	touch $(STAMP)

setup: $(STAMP)

# The embedded default: ResNet on the digits, 8 logical CPU replicas as a 2x4 torus.
run: setup
	$(PY) main.py $(ARGS)

test: setup
	$(PY) tests/run_suites.py $(ARGS)

bench: setup
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf runs
