"""The documentation site's sources: API pages and the hook of its pages.

Building the site (`bash scripts/docs.sh`, MkDocs with warnings as errors)
needs the `docs` extra and runs as its own CI step; these checks need
neither.
"""

import importlib.util
import pathlib
import pkgutil
import types

import pytest

import htmuon_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = sorted(
  m.name
  for m in pkgutil.iter_modules(htmuon_jax.__path__)
  if not m.name.startswith("_")
)


def load_hooks():
  spec = importlib.util.spec_from_file_location(
    "mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", MODULES)
def test_every_module_has_an_api_page_in_the_nav(name):
  page = ROOT / "docs" / "api" / f"{name}.md"
  assert page.exists(), f"add docs/api/{name}.md and list it in mkdocs.yml"
  assert f"::: htmuon_jax.{name}\n" in page.read_text()
  assert f"api/{name}.md" in (ROOT / "mkdocs.yml").read_text()


@pytest.mark.parametrize(
  "link, expected",
  [
    ("[the tables](BENCHMARKS.md)", "[the tables](benchmarks.md)"),
    ("[guide](README.md#install)", "[guide](guide.md#install)"),
    (
      "![loss](docs/main_job/loss_curves.png)",
      "![loss](main_job/loss_curves.png)",
    ),
    (
      "[paper](https://arxiv.org/abs/2603.10067)",
      "[paper](https://arxiv.org/abs/2603.10067)",
    ),
    ("[above](#install)", "[above](#install)"),
    ("[`compare.py`](examples/compare.py)", "`compare.py`"),
    ("[sweep](docs/sweep/)", "[sweep](sweep/README.md)"),
    ("[main job](docs/main_job/)", "[main job](main_job/README.md)"),
    ("[nb](notebooks/quickstart.ipynb)", "[nb](notebook.md)"),
  ],
)
def test_hook_rewrites_repository_links(link, expected):
  hooks = load_hooks()
  assert hooks.LINK.sub(hooks.site_link, link) == expected


@pytest.mark.parametrize(
  "page, link, expected",
  [
    (
      "results.md",
      "[guide](../README.md#install)",
      "[guide](guide.md#install)",
    ),
    (
      "sharding.md",
      "[tables](../BENCHMARKS.md#sharded-step)",
      "[tables](benchmarks.md#sharded-step)",
    ),
    (
      "main_job/README.md",
      "[results](../results.md#main-job)",
      "[results](../results.md#main-job)",
    ),
    ("main_job/README.md", "[guide](../../README.md)", "[guide](../guide.md)"),
    ("examples.md", "[nb](../notebooks/quickstart.ipynb)", "[nb](notebook.md)"),
    ("examples.md", "[`compare.py`](../examples/compare.py)", "`compare.py`"),
    ("results.md", "![loss](main_job/loss_curves.png)", None),
    ("routing.md", "[pieces](optimizers.md#the-pieces)", None),
    ("routing.md", "[paper](https://arxiv.org/abs/2603.10067)", None),
    ("routing.md", "[above](#flax-layouts)", None),
  ],
)
def test_hook_rewrites_links_that_leave_docs(page, link, expected):
  # docs/ pages link relative to themselves (so GitHub follows them too);
  # links within docs/ stay, the others are read from the repository root.
  hooks = load_hooks()
  rewritten = hooks.LINK.sub(lambda m: hooks.docs_page_link(m, page), link)
  assert rewritten == (link if expected is None else expected)


def test_hook_drops_fence_options():
  hooks = load_hooks()
  text = "```python devices=8\nx = 1\n```\n```bash\nls\n```\n"
  assert hooks.FENCE_OPTIONS.sub(r"\1", text) == (
    "```python\nx = 1\n```\n```bash\nls\n```\n"
  )


def test_hook_prepares_docs_pages():
  hooks = load_hooks()
  page = types.SimpleNamespace(file=types.SimpleNamespace(src_uri="x.md"))
  text = "```python devices=8\nx = 1\n```\n[b](../BENCHMARKS.md#a)\n"
  assert hooks.on_page_markdown(text, page, config=None, files=None) == (
    "```python\nx = 1\n```\n[b](benchmarks.md#a)\n"
  )


def test_notebook_page_shows_the_stored_outputs():
  hooks = load_hooks()
  notebook = {
    "cells": [
      {"cell_type": "markdown", "source": ["# Title\n", "text"]},
      {
        "cell_type": "code",
        "source": "print(1)",
        "outputs": [
          {"output_type": "stream", "name": "stdout", "text": ["1\n"]},
          {
            "output_type": "display_data",
            "data": {"image/png": "iVBO\nRw==\n", "text/plain": "<Figure>"},
          },
        ],
      },
    ]
  }
  assert hooks.notebook_markdown(notebook) == (
    "# Title\ntext\n\n```python\nprint(1)\n```\n\n```text\n1\n```\n\n"
    '<img alt="output" src="data:image/png;base64,iVBORw==">\n'
  )


def test_docstring_math_becomes_dollar_blocks():
  spec = importlib.util.spec_from_file_location(
    "griffe_math", ROOT / "scripts" / "griffe_math.py"
  )
  module = importlib.util.module_from_spec(spec)
  import griffe  # noqa: F401  (griffe_math imports it)

  spec.loader.exec_module(module)
  text = "Update:\n\n.. math::\n  W \\leftarrow W\n    - x,\n\nwith x.\n"
  assert module.rst_math_to_dollars(text) == (
    "Update:\n\n$$\nW \\leftarrow W\n  - x,\n$$\n\nwith x.\n"
  )
