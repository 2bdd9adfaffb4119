"""Test session set-up: eight forced CPU devices (a stand-in for a TPU slice) and offline Hugging Face."""

import os

# Must happen before JAX initialises its backends (it does so lazily, at the first device query).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
