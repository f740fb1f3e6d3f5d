"""notebooks/faultsense.ipynb: committed without outputs, and it runs top to bottom.

The notebook is executed by nbclient in the project's own kernel (ipykernel's `python3`
spec, which jupyter_client starts with this interpreter): synthetic data, EDA, a smoke
training run registered under a temporary root, evaluation, the real server started as a
subprocess, /predict, /models, /metrics and /monitor, then clean-up.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "faultsense.ipynb"


def _read() -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def _tagged(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    cells = [c for c in _code_cells(nb) if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one code cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(
        o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout"
    )


def test_committed_notebook_has_no_outputs():
    nb = _read()
    assert _code_cells(nb), "the notebook has no code cells"
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, (
        f"cells {dirty} carry outputs or execution counts: clear them before committing"
    )
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.slow
def test_notebook_runs_top_to_bottom():
    from nbclient import NotebookClient

    nb = _read()
    client = NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()  # CellExecutionError (naming the cell and its traceback) on any error

    cells = _code_cells(nb)
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert all(c.execution_count is not None for c in cells), "a cell did not run"

    summary = json.loads(_stdout(_tagged(nb, "summary")).strip().splitlines()[-1])
    labels = summary["labels"]
    assert len(labels) >= 2
    # Registered by the notebook's training run, and the version it predicted with.
    assert summary["version"] in summary["registry"]
    # One clip per label went through the running server; every answer is a model label.
    assert len(summary["predicted"]) == len(labels)
    assert set(summary["predicted"]) <= set(labels)
    assert summary["metrics_lines"] > 0  # faultsense_ series read from /metrics

    # EDA and evaluation drew figures: balance/durations, one per label, the confusion matrix.
    images = [o for c in cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= len(labels) + 2
    # The last cell stopped the server and removed the notebook's temporary root.
    assert "server stopped: True | root removed: True" in _stdout(cells[-1])
