"""Executes notebooks/quickstart.ipynb end to end (nbclient)."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs():
  path = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name="python3",
      resources={"metadata": {"path": os.path.dirname(path)}})
  client.execute()  # Raises CellExecutionError on any failing cell.
  outputs = "".join(
      o.get("text", "") for c in nb.cells if c.cell_type == "code"
      for o in c.get("outputs", []))
  assert "val accuracy" in outputs and "xmin=median" in outputs
  images = sum("image/png" in o.get("data", {}) for c in nb.cells
               if c.cell_type == "code" for o in c.get("outputs", []))
  assert images >= 2
