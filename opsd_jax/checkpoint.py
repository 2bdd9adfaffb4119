"""Run checkpoints with orbax: the train state, the data iterator's position and the run's metadata.

One checkpoint per saved step holds three items:
* `state`: the `TrainState` (step, parameters, optimizer state, the frozen / EMA teacher), sharded
  arrays saved by every process for its own shards;
* `data`: the grain iterator's state, so a resumed run reads exactly the batches it would have read;
* `meta`: JSON (the step, the PRNG key's data, the metrics at that step; for a LoRA run, the base checkpoint).

A LoRA run's state holds its adapters and their optimizer state only: the frozen base weights are the run's
`model.checkpoint`, loaded again (and adapted) before a restore.

Saves are asynchronous; orbax writes each checkpoint under a temporary name and renames it only when
complete, so a process killed mid-save leaves the previous checkpoint as the latest loadable one.
The last `keep_last` checkpoints are kept, plus the `keep_best` best by `best_metric` (higher is better).

Readers (export, evaluation, generation) open a run read-only (`read_only=True`): they never create,
clean up or delete anything, so reading a run that is still training cannot break its pending save.
Once a save is complete, process 0 seals it: `opsd_checksums.json` in the step's directory holds a BLAKE2b
digest of every file (TensorStore does not checksum the array data: a flipped bit would restore silently).
A restore verifies the seal first. A checkpoint that does not restore (a deleted, truncated or corrupted
file) is skipped for the newest
one that does, with a warning naming it; a checkpoint whose shapes differ from the model is an error
naming the parameter (a changed model config, not a corrupt file).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from opsd_jax.models.precision import param_names
from opsd_jax.models.weights import CheckpointError

logger = logging.getLogger(__name__)

CHECKSUMS = "opsd_checksums.json"  # in each step directory, once the save is complete


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
        read_only: bool = False,
    ):
        self.directory = epath.Path(directory)
        if not str(directory).startswith(("gs://", "s3://")):
            self.directory = epath.Path(Path(directory).absolute())
        self.best_metric = best_metric
        self.read_only = read_only
        keep: list[policies.PreservationPolicy] = [policies.LatestN(n=keep_last)]
        if keep_best:
            keep.append(
                policies.BestN(
                    get_metric_fn=lambda metrics: metrics[best_metric],
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            # A writer removes its own half-written leftovers; a reader touches nothing (the run may be live).
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
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
        base_checkpoint: str | None = None,
    ) -> bool:
        """Starts an (asynchronous) save; `metrics` take part in the keep-best ranking when they hold it.
        `base_checkpoint`: for a state of LoRA adapters, the checkpoint of the frozen weights they adapt."""
        items: dict[str, Any] = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave(
                {
                    "step": int(step),
                    "rng": None if rng is None else jax.random.key_data(rng).tolist(),
                    "metrics": {k: float(v) for k, v in (metrics or {}).items()},
                    **({} if base_checkpoint is None else {"base_checkpoint": str(base_checkpoint)}),
                }
            ),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        ranked = {k: float(v) for k, v in (metrics or {}).items()} if metrics and self.best_metric in metrics else None
        self.wait()  # orbax waits for the previous save anyway; seal it first
        return self.manager.save(step, args=ocp.args.Composite(**items), metrics=ranked, force=force)

    def restore(
        self, step: int | None, abstract_state: Any, *, data_iterator: Any = None
    ) -> tuple[Any, dict[str, Any]]:
        """Restores `state` (onto the shardings of `abstract_state`) and the iterator in place.

        `step=None` takes the newest checkpoint that restores, skipping (with a warning) those that do not.
        Returns `(state, meta)`; `meta["rng"]` is the key data to rebuild the PRNG key with
        `jax.random.wrap_key_data`, `meta["step"]` the step restored.

        Raises:
          CheckpointError: `step` is not saved, no checkpoint restores, or the shapes differ from `abstract_state`.
        """

        def restore_one(step: int) -> tuple[Any, dict[str, Any]]:
            self.verify(step)
            items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
            if data_iterator is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            return restored["state"], restored["meta"]

        step, (state, meta) = self._first_that_restores(step, abstract_state, restore_one)
        logger.info("restored step %d from %s", step, self.directory)
        return state, {**meta, "step": step}

    def _first_that_restores(self, step: int | None, abstract_state: Any, restore_one) -> tuple[int, Any]:
        """`(step, restore_one(step))` for the given step, else for the newest step that restores."""
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"{self.directory}: no checkpoint at step {step}; saved steps: "
                    f"{', '.join(map(str, sorted(steps))) or 'none'}"
                )
            self.check_shapes(step, abstract_state)
            try:
                return step, restore_one(step)
            except Exception as err:  # noqa: BLE001 - any storage failure: name the checkpoint, one line
                raise CheckpointError(
                    f"{self.directory}: checkpoint step {step} does not restore: {_first_line(err)}"
                ) from err
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        failures = []
        for candidate in sorted(steps, reverse=True):
            self.check_shapes(candidate, abstract_state)
            try:
                return candidate, restore_one(candidate)
            except Exception as err:  # noqa: BLE001 - a corrupt checkpoint: fall back to the previous one
                failures.append(f"step {candidate}: {_first_line(err)}")
                logger.warning(
                    "skipping checkpoint step %d in %s: it does not restore (%s)",
                    candidate,
                    self.directory,
                    _first_line(err),
                )
        raise CheckpointError(f"no checkpoint in {self.directory} restores: {'; '.join(failures)}")

    def check_shapes(self, step: int, abstract_state: Any) -> None:
        """Raises `CheckpointError` naming the first parameter whose saved shape differs from `abstract_state`'s
        (a run resumed or exported with another model config). Unreadable metadata is left to the restore."""
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - a corrupt checkpoint fails (and is reported) in the restore itself
            return
        if saved is None:
            return
        saved_leaves = dict(_keyed_leaves(saved))
        for key, leaf in _keyed_leaves(abstract_state):
            stored = saved_leaves.get(key)
            shape = getattr(stored, "shape", None)
            if shape is not None and tuple(shape) != tuple(leaf.shape):
                raise CheckpointError(
                    f"{self.directory}: checkpoint step {step} has {key} of shape {tuple(shape)}, the model config "
                    f"gives {tuple(leaf.shape)}: the run was saved with another model (model.checkpoint)"
                )

    def restore_params(self, step: int | None, abstract_params: Any) -> tuple[int, Any]:
        """Only the trained parameters of a checkpoint (no optimizer state, teacher or iterator): for export
        and evaluation. `abstract_params` gives their shapes, dtypes and shardings. `step=None` takes the newest
        checkpoint that restores. Returns `(step, params)`."""
        target = {"params": abstract_params}

        def restore_one(step: int) -> Any:
            self.verify(step)
            restore = ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
            )
            return self.manager.restore(step, args=ocp.args.Composite(state=restore))["state"]["params"]

        return self._first_that_restores(step, target, restore_one)

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is complete, then seals every complete unsealed step."""
        self.manager.wait_until_finished()
        if self.read_only or jax.process_index() != 0:
            return
        for step in self.all_steps():
            directory = self._step_dir(step)
            if not (directory / CHECKSUMS).exists():
                (directory / CHECKSUMS).write_text(json.dumps(_digests(directory), indent=0, sort_keys=True))

    def verify(self, step: int) -> None:
        """Raises `CheckpointError` naming the first file of `step` that is missing or differs from its seal
        (an unsealed step, whose writer stopped before sealing it, is not checked)."""
        directory = self._step_dir(step)
        seal = directory / CHECKSUMS
        if not seal.exists():
            return
        expected = json.loads(seal.read_text())
        found = _digests(directory)
        for name, digest in sorted(expected.items()):
            if name not in found:
                raise CheckpointError(f"{directory / name}: missing")
            if found[name] != digest:
                raise CheckpointError(f"{directory / name}: contents differ from the checksum taken when it was saved")

    def _step_dir(self, step: int) -> epath.Path:
        return epath.Path(self.manager.directory) / str(step)

    def close(self) -> None:
        self.wait()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """Shape, dtype and sharding of every array of `tree`: the restore target of `RunCheckpointer.restore`."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _first_line(error: BaseException) -> str:
    """The first non-empty line of an error (TensorStore's run to many lines), with its type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _keyed_leaves(tree: Any) -> list[tuple[str, Any]]:
    """`(path like params/layers/0/kernel, leaf)` for every leaf, keys normalised so that a restored
    metadata tree (nested dicts) and an abstract state (dataclasses, nnx.State) name leaves alike."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]:
        # without nnx.Variable's payload name `value`, absent from the saved tree's names
        out.append(("/".join(map(str, param_names(path))), leaf))
    return out


def _digests(directory: epath.Path) -> dict[str, str]:
    """BLAKE2b of every file under `directory` (but the seal itself), by path relative to it."""
    out = {}
    for path in _files(directory):
        if path.name == CHECKSUMS:
            continue
        digest = hashlib.blake2b(digest_size=16)
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        out[str(path.relative_to(directory))] = digest.hexdigest()
    return out


def _files(directory: epath.Path) -> list[epath.Path]:
    """Every file under `directory`, sorted (epath has no recursive glob on gs://)."""
    found = []
    for path in sorted(directory.iterdir()):
        found.extend(_files(path) if path.is_dir() else [path])
    return found
