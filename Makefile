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

# Until the load-balancer pair and `kvha up` land, the local cluster is the
# three example data nodes and one master from etc/, in the foreground, with
# their logs interleaved.  Ctrl-C stops them all.
run: $(STAMP)
	mkdir -p var
	@echo "data nodes on 127.0.0.1:7101-7103; master memcached port 127.0.0.1:11311"
	@pids=""; \
	for f in etc/data-memory.yaml etc/data-log.yaml etc/data-log-always.yaml; do \
	  $(BIN)/twistd --nodaemon --pidfile= --logfile - kvha-data --config $$f & pids="$$pids $$!"; \
	done; \
	$(BIN)/twistd --nodaemon --pidfile= --logfile - kvha-master --config etc/master.yaml & \
	pids="$$pids $$!"; \
	trap 'kill $$pids 2>/dev/null; wait; exit 0' INT TERM; \
	wait

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
