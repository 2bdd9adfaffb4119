"""`python -m opsd_jax.demo` (`make demo`): see `opsd_jax.demo`'s docstring."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from opsd_jax.demo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
