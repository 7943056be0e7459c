# Two commands a fresh machine needs (see README): `make demo` and `make test`.
# Each sets up its own virtual environment first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
# llama-cpp-python ships as an sdist: compile with every core (pip caches the built wheel).
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# A pinned CPU torch first: an unpinned one would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m edge_app.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m edge_runtime.bench --synthetic 2b

clean:
	rm -rf $(VENV) .cache build *.egg-info
