"""The documentation site's sources: API pages and the README/BENCHMARKS hook.

Building the site (`bash scripts/docs.sh`, MkDocs with warnings as errors)
needs the `docs` extra and runs as its own CI step; these checks need
neither.
"""

import importlib.util
import pathlib
import pkgutil

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
  ],
)
def test_hook_rewrites_repository_links(link, expected):
  hooks = load_hooks()
  assert hooks.LINK.sub(hooks.site_link, link) == expected


def test_hook_drops_fence_options():
  hooks = load_hooks()
  text = "```python devices=8\nx = 1\n```\n```bash\nls\n```\n"
  assert hooks.FENCE_OPTIONS.sub(r"\1", text) == (
    "```python\nx = 1\n```\n```bash\nls\n```\n"
  )
