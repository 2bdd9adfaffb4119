"""The `opsd-jax` entry point."""

from __future__ import annotations

import subprocess
import sys

import yaml

from opsd_jax.cli import main


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "--no-device-check", "train.lr=1e-4", "mesh.tensor=2"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == 1e-4 and shown["mesh"]["tensor"] == 2


def test_config_errors_exit_2_with_the_key(capsys):
    assert main(["config", "train.nope=1"]) == 2
    assert "train.nope: unknown key" in capsys.readouterr().err


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "opsd_jax.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "config" in out and "OmniOPSD" in out


def test_overrides_on_both_sides_of_a_flag(capsys):
    assert main(["config", "train.lr=0.5", "--no-device-check", "train.seed=3", "mesh.tensor=2"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["train"]["lr"], shown["train"]["seed"], shown["mesh"]["tensor"]) == (0.5, 3, 2)


def test_log_level_configures_logging_once_for_every_command(capsys):
    import logging

    assert main(["--log-level", "DEBUG", "config", "--no-device-check"]) == 0
    assert logging.getLogger().level == logging.DEBUG and logging.getLogger("absl").level == logging.DEBUG
    assert main(["config", "--no-device-check"]) == 0  # the default: info; orbax's absl warnings hidden
    assert logging.getLogger().level == logging.INFO and logging.getLogger("absl").level == logging.ERROR
    logging.getLogger("opsd_jax.test").info("shown")
    err = capsys.readouterr().err
    assert err.count("INFO opsd_jax.test: shown") == 1, err


def test_the_log_follows_stderr_when_it_is_replaced(capsys):
    import io
    import logging
    import sys

    assert main(["config", "--no-device-check"]) == 0
    capsys.readouterr()
    with capsys.disabled():  # what a later test sees: the stream of the first call is gone
        replaced, sys.stderr = sys.stderr, io.StringIO()
        try:
            logging.getLogger("opsd_jax.test").warning("after")
            assert "WARNING opsd_jax.test: after" in sys.stderr.getvalue()
        finally:
            sys.stderr = replaced
