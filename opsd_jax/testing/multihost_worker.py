"""One process of a local multi-process training run (tests): `python -m opsd_jax.testing.multihost_worker`.

Arguments: the number of local CPU devices, then `opsd-jax train` config overrides. The process joins
the run described by `OPSD_COORDINATOR` / `OPSD_NUM_PROCESSES` / `OPSD_PROCESS_ID` when they are set
(over gloo collectives on the CPU), trains, and process 0 prints the per-step losses as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> None:
    devices, overrides = int(argv[0]), argv[1:]
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    import jax  # after XLA_FLAGS above: the worker's own device count

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from opsd_jax.config import load_config  # after XLA_FLAGS above: they import JAX
    from opsd_jax.train import Trainer, initialize_distributed  # after XLA_FLAGS above: they import JAX

    initialize_distributed()
    trainer = Trainer(load_config(None, overrides))
    summary = trainer.run()
    trainer.checkpointer.close()
    if jax.process_index() == 0:
        print("LOSSES " + json.dumps(summary.losses), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
