"""notebooks/colab_tpu_demo.ipynb: a well-formed notebook whose cells run on the CPU.

The code cells are executed in order, in one namespace (as a kernel would), by a fresh Python process
started in notebooks/; the install cell (tag and marker `colab-install`) is skipped because this
environment has the package installed already.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_tpu_demo.ipynb"
INSTALL_MARKER = "colab-install"

RUNNER = """
import json, sys
cells = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for index, source in cells:
    print(f"=== cell {index}", flush=True)
    exec(compile(source, f"<notebook cell {index}>", "exec"), namespace)
"""


@pytest.fixture(scope="module")
def notebook() -> dict:
    return json.loads(NOTEBOOK.read_text())


def source(cell: dict) -> str:
    return "".join(cell["source"])


def is_install_cell(cell: dict) -> bool:
    return INSTALL_MARKER in cell["metadata"].get("tags", []) or source(cell).startswith(f"# {INSTALL_MARKER}")


def test_notebook_structure(notebook):
    assert notebook["nbformat"] == 4 and notebook["metadata"]["kernelspec"]["language"] == "python"
    cells = notebook["cells"]
    assert cells[0]["cell_type"] == "markdown"
    for previous, cell in zip(cells, cells[1:]):
        if cell["cell_type"] == "code":
            assert previous["cell_type"] == "markdown", f"code cell {cell['id']} has no explanation before it"
            assert cell["outputs"] == [] and cell["execution_count"] is None, "commit the notebook without outputs"
            assert len(source(cell).splitlines()) <= 25, f"code cell {cell['id']} is not small"
    assert len({cell["id"] for cell in cells}) == len(cells)


def test_notebook_opens_with_a_cell_that_shows_the_tpu_devices(notebook, tmp_path):
    first = next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")
    (tmp_path / "cells.json").write_text(json.dumps([(0, source(first))]))
    # A TPU runtime as the cell detects one (the variable TPU VMs set); JAX itself is kept on the CPU.
    env = {**os.environ, "TPU_ACCELERATOR_TYPE": "v5litepod-8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(tmp_path / "cells.json")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TPU runtime ['TPU_ACCELERATOR_TYPE']" in result.stdout
    assert re.search(r"^TPU devices: \d+ \[CpuDevice\(id=0\)", result.stdout, re.MULTILINE), result.stdout


def test_notebook_text_has_no_placeholder_one_time_estimate_and_no_pytorch_requirement(notebook):
    texts = [source(cell) for cell in notebook["cells"]]
    assert not [
        url for text in texts for url in re.findall(r"https?://\S+", text) if re.search(r"YOUR_|example\.|<[^>]*>", url)
    ]
    assert not any(re.search(r"YOUR_[A-Z]+|TODO|FIXME", text) for text in texts)
    assert len([text for text in texts if re.search(r"\bminutes?\b", text)]) == 1, "one time estimate, in one place"
    assert not any(re.search(r"needs? (also )?PyTorch|PyTorch,? which", text) for text in texts)


def test_install_cell_is_marked_and_chooses_the_tpu_extra(notebook):
    install = [cell for cell in notebook["cells"] if cell["cell_type"] == "code" and is_install_cell(cell)]
    assert len(install) == 1
    cell = install[0]
    # Both markers, so that either a tag-aware or a plain reader recognises it.
    assert INSTALL_MARKER in cell["metadata"]["tags"] and source(cell).startswith(f"# {INSTALL_MARKER}")
    text = source(cell)
    assert '".[tpu]" if ON_TPU else "."' in text and '"pip", "install"' in text
    compile(text, "<install cell>", "exec")  # never executed here, so at least it must parse


def test_cells_run_on_the_cpu(notebook, tmp_path):
    cells = [
        (index, source(cell))
        for index, cell in enumerate(notebook["cells"])
        if cell["cell_type"] == "code" and not is_install_cell(cell)
    ]
    cells_file = tmp_path / "cells.json"
    cells_file.write_text(json.dumps(cells))
    # One arm, a few steps: the whole demo has its own test (tests/test_demo.py).
    env = {
        **os.environ,
        "OPSD_DEMO_ARGS": f"--quick --arms omniopsd --conditions standard --workdir {tmp_path / 'demo'}",
    }
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(cells_file)],
        cwd=NOTEBOOK.parent,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"project: {REPO}" in output
    assert "no TPU: the CPU runs everything" in output
    assert re.search(r"^cpu \d+ \[CpuDevice\(id=0\)", output, re.MULTILINE), output  # the devices cell
    assert "### standard" in output and "| omniopsd |" in output  # the demo's table
    assert "fsdp: -1" in output and "batch_size: 64" in output  # the v5e-16 config, resolved
