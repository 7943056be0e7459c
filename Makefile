# Two commands a fresh machine needs (see README): `make demo` and `make test`.
# Each sets up its own virtual environment first.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
# llama-cpp-python ships as an sdist: compile with every core.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

# llama-cpp-python is built with llama.cpp's RPC backend on (edge-rpc-worker, --rpc);
# add your backend with CMAKE_ARGS (e.g. "-DGGML_CUDA=on", "-DGGML_METAL=on").
# pip's wheel cache keys on name and version, not on CMAKE_ARGS, so a wheel built
# without RPC could be reused silently: we build with --no-cache-dir into a folder
# named for the flags and install from there (a fresh clone on the same machine
# reuses it), then check the library really has RPC.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS  := -DGGML_RPC=on $(CMAKE_ARGS)
WHEEL_ROOT ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/qwen3-vl-edge/wheels
# The sdist too: its vendored llama.cpp converter is the reference of the converter tests (tests/support/reference_converter.py).
SDIST_DIR  ?= $(WHEEL_ROOT)/../sdist
WHEEL_DIR  := $(WHEEL_ROOT)/$(shell printf '%s' '$(strip $(LLAMA_CMAKE_ARGS))' | sed 's/-D//g' | tr -c 'A-Za-z0-9=._-' '_')

.PHONY: setup llama-wheel llama-sdist browser demo test test-arm64 docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# A pinned CPU torch first: an unpinned one would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(MAKE) llama-wheel llama-sdist
	# --only-binary: PyPI has only the sdist, so the one candidate is the wheel built above
	# (its own dependencies still come from the index).
	$(BIN)/python -m pip install -q --only-binary llama-cpp-python --find-links '$(WHEEL_DIR)' llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(BIN)/python -m pip install -q -e '.[all]'
	$(BIN)/python -m edge_llama.rpc --require
	touch $(STAMP)

# Builds the llama-cpp-python wheel once per set of flags (5-10 min on 2 cores; needs the venv's pip).
llama-wheel:
	@if ls '$(WHEEL_DIR)'/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "llama-cpp-python $(LLAMA_CPP_VERSION) [$(LLAMA_CMAKE_ARGS)]: reusing $(WHEEL_DIR)"; \
	else \
		echo "llama-cpp-python $(LLAMA_CPP_VERSION) [$(LLAMA_CMAKE_ARGS)]: building into $(WHEEL_DIR)"; \
		rm -rf '$(WHEEL_DIR).tmp' && mkdir -p '$(WHEEL_DIR).tmp' && \
		CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(BIN)/python -m pip wheel -q --no-cache-dir --no-deps \
			-w '$(WHEEL_DIR).tmp' llama-cpp-python==$(LLAMA_CPP_VERSION) && \
		mkdir -p '$(WHEEL_DIR)' && mv '$(WHEEL_DIR).tmp'/llama_cpp_python-*.whl '$(WHEEL_DIR)'/ && \
		rm -rf '$(WHEEL_DIR).tmp'; \
	fi

# Keeps llama-cpp-python's sdist (~75 MB) for the tests' reference converter.
llama-sdist:
	@test -f '$(SDIST_DIR)'/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz || \
		$(BIN)/python -m pip download -q --no-deps --no-binary :all: -d '$(SDIST_DIR)' llama-cpp-python==$(LLAMA_CPP_VERSION)

demo: $(STAMP)
	$(BIN)/python -m edge_app.demo

# The page's browser tests drive the system's headless Chromium (never a downloaded one).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "tests/test_page.py needs Chromium and its driver: sudo apt-get install chromium chromium-driver" >&2; exit 1; fi

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# The site (docs/, mkdocs.yml) into site/. --strict: a broken link or anchor, an API entry that
# cannot be found or shows an object without a docstring (docs/hooks/) fails the build.
docs: $(STAMP)
	@$(BIN)/python -c 'import mkdocs, material, mkdocstrings_handlers.python' 2>/dev/null || \
		$(BIN)/python -m pip install -q -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

# The Raspberry Pi 5 lane (docs/devices.md): an arm64 Debian root under QEMU's Cortex-A76, the
# runtime installed without torch, the torch-free tests and parity with x86 (root, x86-64 host).
test-arm64: $(STAMP)
	HOST_PYTHON=$(abspath $(BIN))/python tests/arm64/lane.sh

bench: $(STAMP)
	$(BIN)/python -m edge_bench --synthetic 2b

clean:
	rm -rf $(VENV) .cache build site *.egg-info
