# The two set-up commands: `make test` and `make demo`. Both build .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
# Devices: the tests force 8 host devices themselves (tests/conftest.py), so that the CPU stands in for a
# TPU slice; the demo runs on one (two cores run one program ~2.5x faster than eight virtual devices
# time-sharing them; tests/test_demo.py runs it the same way, the trainer's sharded paths are covered by
# tests/test_train.py); each benchmark picks its own.
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# The shipped TPU configs, each compiled for its slice by `make bench` (libtpu, no TPU; 5-20 minutes each), and the
# GPU configs for one H100 (the CUDA plugin, pip install -e '.[cuda]', no GPU; 3-5 minutes each).
TPU_CONFIGS := qwen2_5_omni_3b_v5e16 qwen2_5_omni_7b_v5p64 qwen2_5_omni_7b_v4_32 qwen2_5_omni_7b_lora_v5e8
GPU_CONFIGS := gpu_1x_h100 qwen2_5_omni_7b_lora_gpu_1x_h100

.PHONY: test demo bench venv clean

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The tests add their reference implementations (torch, trl), libtpu and the gs:// emulator; the demo needs
# only the package's own dependencies (no torch, no trl).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $(DEMO_STAMP)

# Lint and format first (seconds; the rules are in pyproject.toml), then two workers, one test file each at a time
# (--dist loadfile keeps module fixtures whole): most of the suite is single-threaded XLA compilation, so the
# second core halves it. Files go out in collection order, the longest first (tests/conftest.py), not xdist's
# default of the most tests first, which left the one-test demo file to run alone at the end.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15

demo: $(DEMO_STAMP)
	$(BIN)/python -m opsd_jax.demo

# Every benchmark at its reported sizes (step.py ~25 minutes on 2 cores idle, each TPU compile-check 5-20); each prints its table and writes
# benchmarks/results/NAME.json. benchmarks/README.md says how to read them.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.step
	$(BIN)/python -m benchmarks.forward
	$(BIN)/python -m benchmarks.decode
	$(BIN)/python -m benchmarks.loss_memory --runs 0
	$(BIN)/python -m benchmarks.loss_memory --batch 1 --completion 512 --out benchmarks/results/loss_memory_b1_t512.json
	$(BIN)/python -m benchmarks.data
	$(BIN)/python -m benchmarks.data --num-frames 4 --size 56 --audio-seconds 1.0 --step-rate 3.7 \
		--out benchmarks/results/data_demo.json
	$(BIN)/python -m benchmarks.lora --dtype bfloat16 --runs 0 --decode-tokens 0 --out benchmarks/results/lora_bfloat16.json
	$(BIN)/python -m benchmarks.lora --dtype bfloat16 --runs 3 --out benchmarks/results/lora_decode_bfloat16.json
	$(BIN)/python -m benchmarks.collectives --config configs/qwen2_5_omni_7b_v5p64.yaml
	$(BIN)/python -m benchmarks.cost_model_floor --config configs/qwen2_5_omni_7b_v5p64.yaml
	configs="$(TPU_CONFIGS)"; \
	if $(BIN)/python -c "import jax_plugins.xla_cuda12" 2>/dev/null; then configs="$$configs $(GPU_CONFIGS)"; \
	else echo "GPU configs ($(GPU_CONFIGS)) not compiled: the CUDA plugin is missing, pip install -e '.[cuda]'" >&2; fi; \
	failed=""; for config in $$configs; do \
		$(BIN)/opsd-jax compile-check --config configs/$$config.yaml --out benchmarks/results/compile_$$config.json \
			|| failed="$$failed $$config"; \
	done; test -z "$$failed" || { echo "compile-check failed:$$failed" >&2; exit 1; }

clean:
	rm -rf $(VENV) .pytest_cache
