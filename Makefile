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

.PHONY: serve test install install-dev pull system-deps clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# llama-cpp-python compiles from source (minutes); pip's wheel cache keeps the build.
$(VENV)/.installed: pyproject.toml | $(PY)
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
# config in front of two gateways), openssl (its test certificate).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_DEPS := redis-server nginx openssl
system-deps:
	@missing=""; for dep in $(SYSTEM_DEPS); do \
	  command -v $$dep >/dev/null || [ -x /usr/sbin/$$dep ] || missing="$$missing $$dep"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y $$missing; fi

test: system-deps install-dev pull
	$(PY) -m pytest -q -ra

clean:
	rm -rf $(VENV) build *.egg-info
