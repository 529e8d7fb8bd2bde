# kvha: bootstrap, run, test and benchmark.  Every target creates the
# virtual environment first when it is missing or older than pyproject.toml.

# `make bench PY=pypy3` runs the benchmark and every kvha node under PyPy 3.9
# (Debian: apt-get install pypy3 pypy3-venv pypy3-dev; mmh3 compiles against it)
# and writes bench/results/*-pypy.* beside the CPython results.
PY ?= python3
ifeq ($(findstring pypy,$(PY)),pypy)
VENV ?= .venv-pypy
EXTRAS ?= bench
else
VENV ?= .venv
EXTRAS ?= test
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On CPython the hot modules (kvha/compiled.py) are compiled by mypyc beside
# their sources (setup.py), and rebuilt whenever any kvha module changes (the
# compiled code checks the types of the modules it uses): an extension built
# from an older source would run instead of the new one.
COMPILED := $(VENV)/.compiled
SOURCES := $(wildcard kvha/*.py kvha/*/*.py)

export PYTHONPATH := $(CURDIR)

.PHONY: venv run test lint bench clean pure

venv: $(COMPILED)

# KVHA_PURE=1: pip installs without compiling (the next rule does, in place).
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	KVHA_PURE=1 $(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

# Under PyPy nothing is compiled (setup.py skips it).  `make pure` removes
# the compiled modules; KVHA_PURE=1 make ... keeps them from being rebuilt.
$(COMPILED): $(STAMP) setup.py $(SOURCES)
ifeq ($(findstring pypy,$(PY)),pypy)
	touch $(COMPILED)
else
	rm -f kvha/*.so kvha/*/*.so kvha/hot_build.json
	$(if $(KVHA_PURE),true,$(BIN)/python setup.py build_ext --inplace --parallel 2 > $(VENV)/compile.log 2>&1 || (cat $(VENV)/compile.log; false))
	$(BIN)/python -c 'import kvha.compiled as c; print("kvha hot path:", c.describe())'
	touch $(COMPILED)
endif

# The local cluster of etc/local.yaml: two load balancers holding the VIP
# 127.0.0.100 (redis 6379, memcached 11211, http 8080), two masters and three
# data nodes, in the foreground.  Ctrl-C stops them all.
run: $(COMPILED)
	$(BIN)/kvha up etc/local.yaml

test: $(COMPILED)
	$(BIN)/ruff check kvha tests bench twisted
	$(BIN)/ruff format --check kvha tests bench twisted
	$(BIN)/mypy
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check kvha tests bench twisted
	$(BIN)/ruff format --check kvha tests bench twisted
	$(BIN)/mypy

# `kvha bench` (kvha/cli.py): bench/run.py (data node, protocols beside
# redis-server and memcached, memory), bench/storage.py (every storage engine
# with 100,000 and 1,000,000 records; a few minutes) and bench/hotpath.py (the
# Python work per request in one process, without sockets: the figure to
# compare before and after a change).  BENCH_ARGS are kvha bench's options:
# --quick (run.py's replicas-1 target only), --sections data,protocols,memory,
# --repeats N, --requests N, --big (1 GB of 10 KiB values in mmap-index).
bench: $(COMPILED)
	$(BIN)/kvha bench $(BENCH_ARGS)

pure:
	rm -f kvha/*.so kvha/*/*.so kvha/hot_build.json $(COMPILED)

clean: pure
	rm -rf $(VENV) .venv-pypy var build *.egg-info
