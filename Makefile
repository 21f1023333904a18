# The two commands: `make serve` and `make test`. Everything else here serves them.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# The paged engine's torch. On Linux dev machines this resolves to a CPU build where one is
# on local disk; override with TORCH='torch' (or a CUDA wheel) on GPU nodes.
TORCH  ?= torch==2.13.0
HOST   ?= 127.0.0.1
PORT   ?= 8080
MODEL  ?= smollm2-135m

# llama-cpp-python is compiled here, portably (issue 12): never -march=native, which on a VM that
# advertises a CPU feature its kernel does not grant (AMX) dies of SIGILL. ggml builds one CPU
# module per x86 micro-architecture into llama_cpp/lib instead, and
# backends/llamacpp/cpu_variants.py registers the best one the machine and its kernel can run.
LLAMA_CPP_VERSION := 0.3.36
# GGML_BACKEND_DIR is typed STRING: an untyped relative path is made absolute against the
# build's source tree (a cache PATH), and the modules would be left out of the wheel.
LLAMA_CMAKE_ARGS  := -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
                     -DGGML_BACKEND_DIR:STRING=llama_cpp/lib -DLLAVA_BUILD=OFF
# Symbols kept (scikit-build-core strips by default): a crash backtrace names the function, and
# tests/unit/test_llamacpp_build.py checks where the AMX instructions are by function name.
LLAMA_STRIP       := false
# The wheel is built once per version, flags and platform, into a wheelhouse that `make clean`
# keeps; the same hash is in the venv's stamp, so changing the flags reinstalls.
LLAMA_KEY  := $(shell printf '%s' '$(LLAMA_CMAKE_ARGS) strip=$(LLAMA_STRIP) '"$$(uname -sm)" | \
                python3 -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest()[:12])')
WHEELHOUSE ?= $(HOME)/.cache/turnout/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_KEY)
LLAMA_STAMP := $(VENV)/.llama-cpp-python-$(LLAMA_CPP_VERSION)-$(LLAMA_KEY)
NPROC      := $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)

.PHONY: serve test install install-dev pull system-deps clean FORCE

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# --no-cache-dir: pip's own cache may hold a native build of the same version; never reuse it.
$(WHEELHOUSE)/.built: | $(PY)
	mkdir -p $(WHEELHOUSE)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" SKBUILD_INSTALL_STRIP=$(LLAMA_STRIP) CMAKE_BUILD_PARALLEL_LEVEL=$(NPROC) \
	  $(PIP) wheel --no-deps --no-cache-dir --wheel-dir $(WHEELHOUSE) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(PY) -c 'import glob, sys, zipfile; whl = glob.glob(sys.argv[1] + "/llama_cpp_python-*.whl")[0]; \
	  sys.exit(not any(n.startswith("llama_cpp/lib/libggml-cpu-") for n in zipfile.ZipFile(whl).namelist()))' \
	  $(WHEELHOUSE) || { echo "llama-cpp-python: the wheel has no CPU variant modules"; exit 1; }
	touch $@

# Installed from the wheelhouse alone (--no-index), before `pip install -e .` (which then finds
# the requirement met and adds llama-cpp-python's own dependencies). A llama_cpp whose lib/ has
# no CPU variant modules is a native build, whatever the stamps say: reinstall it.
ifeq ($(wildcard $(VENV)/lib/python3*/site-packages/llama_cpp/lib/libggml-cpu-*.so),)
$(LLAMA_STAMP): FORCE
endif
$(LLAMA_STAMP): $(WHEELHOUSE)/.built | $(PY)
	$(PIP) install --no-index --no-deps --force-reinstall --find-links $(WHEELHOUSE) \
	  llama-cpp-python==$(LLAMA_CPP_VERSION)
	rm -f $(VENV)/.llama-cpp-python-*
	touch $@

$(VENV)/.installed: pyproject.toml $(LLAMA_STAMP) | $(PY)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e '.[paged,dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

pull: install
	$(VENV)/bin/turnout pull $(MODEL)

serve: pull
	$(VENV)/bin/turnout serve --host $(HOST) --port $(PORT)

# Debian packages the tests start for real: redis-server (shared limits), nginx (the deploy
# config in front of two gateways), openssl (its test certificate), chromium (the console's
# browser tests, driven by Playwright with no browser download).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_DEPS := redis-server nginx openssl chromium
system-deps:
	@missing=""; for dep in $(SYSTEM_DEPS); do \
	  command -v $$dep >/dev/null || [ -x /usr/sbin/$$dep ] || missing="$$missing $$dep"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y $$missing; fi

test: system-deps install-dev pull
	$(PY) -m pytest -q -ra

clean:
	rm -rf $(VENV) build *.egg-info

FORCE:
