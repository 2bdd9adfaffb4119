# The two set-up commands: `make test` and `make demo`. Both build .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Eight forced host devices let the CPU stand in for a TPU slice in sharding tests and the demo.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test demo venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m opsd_jax.demo

clean:
	rm -rf $(VENV) .pytest_cache
