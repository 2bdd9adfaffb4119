"""Run checkpoints with orbax: the train state, the data iterator's position and the run's metadata.

One checkpoint per saved step holds three items:
* `state`: the `TrainState` (step, parameters, optimizer state, the frozen / EMA teacher), sharded
  arrays saved by every process for its own shards;
* `data`: the grain iterator's state, so a resumed run reads exactly the batches it would have read;
* `meta`: JSON (the step, the PRNG key's data, the metrics at that step).

Saves are asynchronous; orbax writes each checkpoint under a temporary name and renames it only when
complete, so a process killed mid-save leaves the previous checkpoint as the latest loadable one.
The last `keep_last` checkpoints are kept, plus the `keep_best` best by `best_metric` (higher is better).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grain
from etils import epath
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

logger = logging.getLogger(__name__)


class RunCheckpointer:
    """Saves and restores a run; one per output directory."""

    def __init__(
        self,
        directory: str | Path,
        *,
        keep_last: int = 2,
        keep_best: int = 1,
        best_metric: str = "eval/accuracy",
        async_save: bool = True,
    ):
        self.directory = epath.Path(directory)
        if not str(directory).startswith(("gs://", "s3://")):
            self.directory = epath.Path(Path(directory).absolute())
        self.best_metric = best_metric
        keep: list[policies.PreservationPolicy] = [policies.LatestN(n=keep_last)]
        if keep_best:
            keep.append(policies.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric], n=keep_best,
                keep_checkpoints_without_metrics=False,
            ))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint (half-written ones are never listed)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iterator: Any = None,
        rng: jax.Array | None = None,
        metrics: dict[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts an (asynchronous) save; `metrics` take part in the keep-best ranking when they hold it."""
        items: dict[str, Any] = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave({
                "step": int(step),
                "rng": None if rng is None else jax.random.key_data(rng).tolist(),
                "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            }),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        ranked = {k: float(v) for k, v in (metrics or {}).items()} if metrics and self.best_metric in metrics else None
        return self.manager.save(step, args=ocp.args.Composite(**items), metrics=ranked, force=force)

    def restore(self, step: int | None, abstract_state: Any, *, data_iterator: Any = None) -> tuple[Any, dict[str, Any]]:
        """Restores `state` (onto the shardings of `abstract_state`) and the iterator in place.

        Returns `(state, meta)`; `meta["rng"]` is the key data to rebuild the PRNG key with
        `jax.random.wrap_key_data`.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        items: dict[str, Any] = {
            "state": ocp.args.StandardRestore(abstract_state),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        logger.info("restored step %d from %s", step, self.directory)
        return restored["state"], restored["meta"]

    def restore_params(self, step: int | None, abstract_params: Any) -> Any:
        """Only the trained parameters of a checkpoint (no optimizer state, teacher or iterator): for export
        and evaluation. `abstract_params` gives their shapes, dtypes and shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        target = {"params": abstract_params}
        restore = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
        restored = self.manager.restore(step, args=ocp.args.Composite(state=restore))
        return restored["state"]["params"]

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """Shape, dtype and sharding of every array of `tree`: the restore target of `RunCheckpointer.restore`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
