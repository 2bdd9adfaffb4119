"""Test session set-up: eight forced CPU devices (a stand-in for a TPU slice) and offline Hugging Face."""

import os

# Must happen before JAX initialises its backends (it does so lazily, at the first device query).
# The tiny programs here spend far longer compiling than running. Optimisation level 0 lowers how hard the
# CPU backend optimises the code it generates, not what the program computes: tests/opsd/test_step.py from a
# cold cache compiles and runs in 133 s instead of 174. Subprocesses (the demo, the notebook, multi-host runs)
# inherit the flags.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiled programs are cached on disk and shared by the test session and the subprocesses it starts
# (multi-host runs, the notebook, the demo): most compile time in this suite is the same tiny programs.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.environ.get("TMPDIR", "/tmp"), f"opsd-jax-test-xla-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

# Tiny reference thinkers shared by every test package (built once per test session).
import pytest  # noqa: E402

from opsd_jax.testing.reference import (  # noqa: E402
    build_reference_thinker,
    save_reference_thinker,
    tiny_thinker_config_dict,
)


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory):
    """(reference model, checkpoint dir): untied head, 4 query heads over 2 KV heads."""
    model = build_reference_thinker(tiny_thinker_config_dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=False))
    return model, save_reference_thinker(model, tmp_path_factory.mktemp("tiny_untied"))


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory):
    """(reference model, checkpoint dir): tied embeddings, 8 query heads over 1 KV head, 3 layers."""
    config = tiny_thinker_config_dict(
        hidden_size=64, num_layers=3, num_heads=8, num_kv_heads=1, tie_word_embeddings=True, mrope_section=(1, 1, 2)
    )
    model = build_reference_thinker(config, seed=1)
    return model, save_reference_thinker(model, tmp_path_factory.mktemp("tiny_tied"))


@pytest.fixture(scope="session")
def tiny_prompt_builder(tmp_path_factory):
    """A `PromptBuilder` over the tiny BPE tokenizer whose special ids match the tiny thinkers."""
    from opsd_jax.data.chat_template import PromptBuilder
    from opsd_jax.testing.tokenizer import build_tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(directory)
    return PromptBuilder.from_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_untied, tmp_path_factory):
    """The tiny untied thinker with the tiny tokenizer beside it, as a real checkpoint directory holds both."""
    import shutil

    from opsd_jax.testing.tokenizer import build_tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny_checkpoint")
    shutil.copytree(tiny_untied[1], directory, dirs_exist_ok=True)
    build_tiny_tokenizer(directory)
    return directory


# The files that take minutes (cold cache, two workers; most run subprocesses) are handed out first. `make test`
# gives each worker a whole file at a time in collection order (`--dist loadfile --no-loadscope-reorder`): one
# started last would keep its worker busy long after the other has finished (the demo's file alone: ~6 minutes).
LONGEST_FIRST = (
    "tests/test_shipped_configs.py",
    "tests/test_demo.py",
    "tests/test_train.py",
    "tests/compile_check/test_compile_check.py",
    "tests/test_notebook.py",
    "tests/benchmarks/test_step.py",
    "tests/benchmarks/test_collectives.py",
    "tests/test_packaging.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(LONGEST_FIRST)))  # stable: the rest keep order
