"""The package as a user installs it: `pip install .` of the wheel into a fresh virtual environment, then
`opsd-jax train --config demo_tiny` run from outside the source tree.

The wheel is built offline (`--no-build-isolation`, the test venv's setuptools) from a copy of the package
files, and installed with `--no-deps` into a venv that borrows the test venv's installed dependencies
through a `.pth` line written after the install (so pip never sees, or touches, the test venv's own
packages). A full resolve from PyPI would download gigabytes; what this checks is what the wheel holds
and that the installed copy (not the checkout) finds its configs and trains.
"""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_FILES = ("pyproject.toml", "README.md", "LICENSE", "opsd_jax")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in PACKAGE_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (built,) = out.glob("opsd_jax-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv's bin/ directory with the wheel installed (and the test venv's dependencies on its path)."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "test_venv_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_wheel_holds_the_configs_the_license_and_tested_bounds(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = email.message_from_bytes(archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
        license_text = archive.read(next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))).decode()
    shipped = {Path(name).name for name in names if name.startswith("opsd_jax/configs/")}
    assert (
        shipped == {path.name for path in (REPO / "opsd_jax" / "configs").glob("*.yaml")}
        and "demo_tiny.yaml" in shipped
    )
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    requires = metadata.get_all("Requires-Dist")
    runtime = [line for line in requires if "extra ==" not in line]
    # jax and flax only as the tested pair; torch and trl only for the tests.
    assert "jax==0.10.2" in runtime and "flax==0.12.8" in runtime
    assert not [line for line in runtime if line.split("[")[0].split("=")[0].split(">")[0].strip() in ("torch", "trl")]


def test_installed_package_trains_the_demo_config_from_outside_the_tree(installed, tiny_untied, tmp_path):
    from opsd_jax.testing.tiny_run import build_tiny_run_files

    files = build_tiny_run_files(tmp_path / "files", tiny_untied[1])
    env = {**os.environ, "PYTHONPATH": "", "PYTHONSAFEPATH": "1"}
    where = subprocess.run(
        [str(installed / "python"), "-c", "import opsd_jax; print(opsd_jax.__file__)"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert Path(where).resolve().is_relative_to(installed.parent.resolve()), where  # the installed copy
    result = subprocess.run(
        [
            str(installed / "opsd-jax"),
            "train",
            "--config",
            "demo_tiny",
            f"model.checkpoint={files.checkpoint}",
            f"data.train_dir={files.dataset}",
            f"data.eval_dir={files.dataset}",
            "data.eval_clips=4",
            f"run.output_dir={tmp_path / 'run'}",
            "train.total_steps=1",
            "train.warmup_steps=0",
            "mesh.fsdp=-1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "trained to step 1" in result.stdout
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_make_demo_installs_the_package_without_the_test_extra(tmp_path):
    plan = subprocess.run(
        ["make", "-n", "demo", f"VENV={tmp_path / 'venv'}"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    installs = [line for line in plan.splitlines() if " install " in line and "--upgrade pip" not in line]
    assert installs == [f"{tmp_path / 'venv'}/bin/pip install --quiet -e ."], plan
