"""Executes notebooks/quickstart.ipynb end to end (nbclient)."""

import os


import nbformat
import nbclient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs():
  path = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    nb,
    timeout=300,
    kernel_name="python3",
    resources={"metadata": {"path": os.path.dirname(path)}},
  )
  client.execute()  # Raises CellExecutionError on any failing cell.
  outputs = "".join(
    o.get("text", "")
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
  )
  assert "val accuracy" in outputs and "xmin=median" in outputs
  images = sum(
    "image/png" in o.get("data", {})
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
  )
  assert images >= 2


def test_install_instructions_use_the_repository():
  # The package is not on a package index: every `pip install` in the
  # notebook must name a local path, relative to the notebook's folder.
  path = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
  nb = nbformat.read(path, as_version=4)
  commands = [
    line
    for c in nb.cells
    for line in c.source.splitlines()
    if "pip install" in line
  ]
  assert commands
  for line in commands:
    target = line.split("pip install", 1)[1].split("#")[0].split()[-1]
    target = target.strip("\"'").split("[")[0]
    assert target.startswith("."), line
    # Paths are relative to the notebook's folder (where its kernel runs).
    assert os.path.exists(
      os.path.join(os.path.dirname(path), target, "pyproject.toml")
    ), line


def test_committed_notebook_has_its_outputs():
  # Committed executed, top to bottom, so that it shows its plots and
  # numbers on GitHub and on the docs site (which renders the stored outputs
  # and does not run it). Re-run it with its outputs after editing a cell
  # (e.g. `jupyter nbconvert --to notebook --execute --inplace`).
  path = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
  nb = nbformat.read(path, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  ran = [c.execution_count for c in code if c.execution_count is not None]
  assert ran == list(range(1, len(ran) + 1)), ran
  # Every cell ran, except the commented-out install cell.
  skipped = [c.source for c in code if c.execution_count is None]
  assert all(
    all(line.startswith("#") for line in s.splitlines() if line.strip())
    for s in skipped
  ), skipped
  outputs = [o for c in code for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs)
  assert "val accuracy" in text and "ms/step" in text
  assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
