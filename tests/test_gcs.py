"""Runs on gs:// as TPU pods write them: checkpoints, metrics, TensorBoard events, rationales and predictions
through the same code paths as a local directory, against a GCS emulator on 127.0.0.1 that the tests start
and stop themselves (gcp-storage-emulator, in memory; nothing leaves the machine)."""

from __future__ import annotations

import json
import socket

import jax
import numpy as np
import pytest
from etils import epath

from opsd_jax.checkpoint import RunCheckpointer, abstract_like
from opsd_jax.train import Trainer
from tests.test_train import config_for, params_of, run_setup  # noqa: F401 - the module's fixture

BUCKET = "opsd-test"


def _with_generation_headers(patch: pytest.MonkeyPatch) -> None:
    """The emulator's downloads, with the `x-goog-generation` header real GCS sends (TensorStore, which
    orbax writes arrays with, reads each object's generation from it and fails without it)."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        original(request, response, storage, *args, **kwargs)
        try:
            found = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 - not found: the original handler answered 404
            return
        response["x-goog-generation"] = str(found["generation"])
        response["x-goog-metageneration"] = str(found["metageneration"])

    patch.setattr(objects, "download", download)
    for _, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if handler is original:
                patch.setitem(methods, method, download)


@pytest.fixture(scope="module")
def gcs():
    """The emulator, with TensorStore (orbax's arrays) and gcsfs (etils.epath: everything else) pointed at it."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        _with_generation_headers(patch)
        server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
        server.start()
        patch.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs
        patch.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # orbax's array data
        patch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # TensorStore sends it instead of asking Google
        try:
            yield f"gs://{BUCKET}"
        finally:
            server.stop()


def test_training_checkpoints_and_logs_on_gcs(run_setup, gcs):  # noqa: F811
    """Save (asynchronous), keep-last/best rotation, resume, metrics and TensorBoard events on gs://."""
    output = f"{gcs}/runs/train"
    settings = [
        f"run.output_dir={output}",
        "run.save_every=1",
        "run.keep_last=2",
        "run.keep_best=1",
        "run.eval_every=2",
        "run.async_checkpointing=true",
    ]
    first = Trainer(config_for(run_setup, "unused", *settings))
    part = first.run(max_steps=3)
    first.checkpointer.close()
    run = epath.Path(output)
    steps_after_3 = RunCheckpointer(run / "checkpoints", read_only=True).all_steps()
    second = Trainer(config_for(run_setup, "unused", *settings))
    rest = second.run(resume=True)
    second.checkpointer.close()
    assert part.steps == 3 and rest.steps == 4

    # Rotation: the last two, plus the best evaluated one (steps 2 and 4 carry eval/accuracy).
    reader = RunCheckpointer(run / "checkpoints", read_only=True)
    assert steps_after_3 == [2, 3] and set(reader.all_steps()) >= {3, 4} and len(reader.all_steps()) <= 3
    assert 1 not in reader.all_steps()
    state, meta = reader.restore(None, abstract_like(second.state))  # verified against its seal first
    assert meta["step"] == 4
    for a, b in zip(jax.tree.leaves(state.params), params_of(second)):
        np.testing.assert_array_equal(np.asarray(a), b)

    # Logs: the resumed run's lines follow the first run's (an object store has no append).
    logs = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logs] == [1, 2, 3, 4]
    assert [p.name for p in (run / "logs" / "tensorboard").iterdir() if p.name.startswith("events.out.tfevents")]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    # A second run into the same gs:// directory is refused like a local one.
    from opsd_jax.train import RunDirectoryError, train

    with pytest.raises(RunDirectoryError, match=f"run.output_dir {output} already holds a run"):
        train(config_for(run_setup, "unused", *settings))


@pytest.mark.parametrize(
    "command",
    [
        [
            "rationales",
            "--manifest",
            "m.jsonl",
            "--out",
            "gs://b/rationales.jsonl",
            "--model",
            "m",
            "--base-url",
            "http://x",
        ],
        ["eval", "score", "--predictions", "gs://b/predictions.jsonl", "--wheel-dir", "w"],
        ["eval", "--checkpoint", "c", "--data", "m.jsonl", "--wheel-dir", "w", "--out", "gs://b/eval"],
        ["generate", "--checkpoint", "c", "--manifest", "m.jsonl", "--out", "gs://b/answers.jsonl"],
        ["export", "--checkpoint", "gs://b/runs/train", "--out", "out"],
    ],
)
def test_paths_that_must_be_local_refuse_a_bucket_by_name(command, capsys):
    """Rationales, predictions and answers are appended and fsync'ed line by line, which an object store cannot
    do: those files are refused on gs:// (pathlib would have read gs://b/x as the local directory gs:/b/x)."""
    from opsd_jax.cli import main

    with pytest.raises(SystemExit) as exit_status:
        main(command)
    assert exit_status.value.code == 2
    err = capsys.readouterr().err
    assert "gs://b/" in err and "expected a local path; only run.output_dir may be a gs:// URL" in err


@pytest.mark.parametrize(
    "override", ["model.checkpoint=gs://b/thinker", "data.train_dir=gs://b/tfds", "data.eval_dir=gs://b/tfds"]
)
def test_config_refuses_a_bucket_where_only_local_paths_work(override):
    from opsd_jax.config import ConfigError, load_config

    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: gs://b/\S+ must be a local path; only run.output_dir may be"):
        load_config(None, [override], num_devices=None)
