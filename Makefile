# kvha: bootstrap, run, test and benchmark.  Every target creates the
# virtual environment first when it is missing or older than pyproject.toml.

PY ?= python3
ifeq ($(findstring pypy,$(PY)),pypy)
VENV ?= .venv-pypy
else
VENV ?= .venv
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export PYTHONPATH := $(CURDIR)

.PHONY: venv run test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# Until the master and load-balancer roles land, the local cluster is the
# example data nodes in etc/ (one memory, one log), in the foreground.
# Ctrl-C stops them all.
run: $(STAMP)
	mkdir -p var
	@echo "starting data nodes: etc/data-memory.yaml (port 7101), etc/data-log.yaml (port 7102)"
	@trap 'kill 0' INT TERM; \
	for f in etc/data-memory.yaml etc/data-log.yaml; do \
	  $(BIN)/twistd --nodaemon --pidfile= --logfile - kvha-data --config $$f & \
	done; wait

test: $(STAMP)
	$(BIN)/ruff check kvha tests bench twisted
	$(BIN)/ruff format --check kvha tests bench twisted
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check kvha tests bench twisted
	$(BIN)/ruff format --check kvha tests bench twisted
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-pypy var build *.egg-info
