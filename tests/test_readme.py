"""Runs every ```python code block of README.md and docs/, as a reader would.

The documents are README.md and the Markdown pages of docs/ (the API pages
there are generated from the docstrings, whose examples test_doctests.py
runs). Each block must run on its own (its imports and data included), in a fresh
namespace. The fence's info string may carry words after `python`:

* `devices=N`: the block runs in a subprocess on N forced CPU devices
  (`XLA_FLAGS=--xla_force_host_platform_device_count=N`), e.g. sharding.
* `subprocess`: the block runs in a subprocess (one CPU device), for blocks
  that change global JAX configuration.
* `no-run`: the block is deliberately not run (say why in the text).

Other blocks are executed in the test process. New blocks and pages are
picked up automatically; GitHub renders `python devices=8` as Python. Test
ids name the document, the section and the line, e.g.
`README-quickstart-line78` or `docs-sharding-state-shardings-line30`.
"""

import os
import pathlib
import re
import subprocess
import sys
import textwrap
from typing import NamedTuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# README.md and the pages of docs/ but the generated API reference.
DOCUMENTS = [README] + sorted(
  p for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] != "api"
)
PYTHON_LANGS = ("python", "py", "python3")
OPTIONS = ("no-run", "subprocess")
# A fenced block, possibly indented (e.g. in a list item): indent, info, body.
FENCE = re.compile(
  r"^([ \t]*)```([^\n`]*)\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL
)
TIMEOUT_S = 600


class Block(NamedTuple):
  path: str  # the document, relative to the repository root
  line: int  # 1-based line of the opening fence
  section: str  # the nearest heading above it
  options: tuple[str, ...]
  source: str


def python_blocks(text: str, path: str = "") -> list[Block]:
  """The python code blocks of a markdown text, with their fence options."""
  blocks = []
  for match in FENCE.finditer(text):
    info = match.group(2).split()
    if not info or info[0].lower() not in PYTHON_LANGS:
      continue
    before = text[: match.start()]
    headings = re.findall(r"^#+ +(.+)$", FENCE.sub("", before), re.MULTILINE)
    blocks.append(
      Block(
        path=path,
        line=before.count("\n") + 1,
        section=headings[-1] if headings else "",
        options=tuple(info[1:]),
        source=textwrap.dedent(match.group(3)),
      )
    )
  return blocks


def block_id(block: Block) -> str:
  document = re.sub(r"[^A-Za-z0-9_]+", "-", block.path.removesuffix(".md"))
  slug = re.sub(r"[^a-z0-9]+", "-", block.section.lower()).strip("-")
  return f"{document}-{slug}-line{block.line}"


def relative(path: pathlib.Path) -> str:
  return path.relative_to(ROOT).as_posix()


BLOCKS = [
  block
  for document in DOCUMENTS
  for block in python_blocks(document.read_text(), relative(document))
]


def device_count(block: Block) -> int | None:
  for option in block.options:
    if option.startswith("devices="):
      return int(option.split("=", 1)[1])
  return None


def test_fence_parser_sees_options():
  text = (
    "# A\n```python\nx = 1\n```\n## B\n```bash\n# not a heading\n```\n"
    "```python devices=8\ny = 2\n```\n"
  )
  blocks = python_blocks(text)
  assert [b.section for b in blocks] == ["A", "B"]
  assert blocks[0].source == "x = 1\n" and blocks[0].line == 2
  assert blocks[1].options == ("devices=8",) and device_count(blocks[1]) == 8
  indented = python_blocks(
    "- item:\n\n  ```python\n  if x:\n    y = 1\n  ```\n"
  )
  assert [b.source for b in indented] == ["if x:\n  y = 1\n"]


def test_block_ids_name_document_section_and_line():
  (block,) = python_blocks(
    "## Flax layouts\n```python\nx = 1\n```\n", "docs/routing.md"
  )
  assert block_id(block) == "docs-routing-flax-layouts-line2"


def test_readme_has_the_documented_blocks():
  # The README: the quickstart with Optax, Flax NNX and Equinox; docs/: the
  # routing rules, sharding (on 8 devices), Flax layouts and reliability.
  readme = [b for b in BLOCKS if b.path == "README.md"]
  assert len(readme) >= 3, [block_id(b) for b in readme]
  assert len(BLOCKS) >= 7, [block_id(b) for b in BLOCKS]
  assert any(device_count(b) == 8 for b in BLOCKS)


def known_option(option: str) -> bool:
  return (
    option in OPTIONS
    or re.fullmatch(r"devices=[1-9][0-9]*", option) is not None
  )


@pytest.mark.parametrize("block", BLOCKS, ids=block_id)
def test_block_options_are_known(block):
  unknown = [o for o in block.options if not known_option(o)]
  assert not unknown, (
    f"{block.path}:{block.line}: unknown fence options {unknown}"
  )


def run_in_subprocess(block: Block, devices: int | None) -> None:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  if devices is not None:
    env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + " --xla_force_host_platform"
      f"_device_count={devices}"
    ).strip()
  env["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), env.get("PYTHONPATH")) if p
  )
  # Blank lines first, so tracebacks point at the document's line numbers.
  source = "\n" * block.line + block.source
  proc = subprocess.run(
    [sys.executable, "-c", source],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
    check=False,
  )
  assert proc.returncode == 0, (
    f"{block.path}:{block.line} failed\n{proc.stdout[-5000:]}"
    f"{proc.stderr[-10000:]}"
  )


def check_quickstart(namespace: dict) -> None:
  # The quickstart trains a small MLP on a learnable toy task: its loss must
  # fall well below the initial value (chance level is ln 10 = 2.3; the
  # block's 100 steps went from 2.59 to 0.27).
  final = float(namespace["loss_fn"](namespace["params"], namespace["batch"]))
  initial = float(namespace["initial"])
  assert final < 0.5 * initial, (initial, final)


# Extra checks on what the first block of a (document, section) leaves in
# its namespace.
CHECKS = {("README.md", "Quickstart"): check_quickstart}


def where(block: Block) -> tuple[str, str]:
  return block.path, block.section


def first_of_section(block: Block) -> bool:
  return block == next(b for b in BLOCKS if where(b) == where(block))


def test_checked_sections_exist():
  sections = {where(b) for b in BLOCKS}
  assert set(CHECKS) <= sections, sorted(sections)


# `no-run` blocks are deliberately left out (their text says why).
@pytest.mark.parametrize(
  "block", [b for b in BLOCKS if "no-run" not in b.options], ids=block_id
)
def test_readme_block_runs(block, capsys):
  devices = device_count(block)
  if devices is not None or "subprocess" in block.options:
    run_in_subprocess(block, devices)
    return
  namespace = {"__name__": "__readme__"}
  # Blank lines first, so tracebacks point at the document's line numbers.
  code = compile(
    "\n" * block.line + block.source, str(ROOT / block.path), "exec"
  )
  exec(code, namespace)  # pylint: disable=exec-used
  capsys.readouterr()  # the blocks print; keep the test log short
  if where(block) in CHECKS and first_of_section(block):
    CHECKS[where(block)](namespace)


def test_the_two_commands_come_first():
  # A newcomer finds the main job and the tests without scrolling, then a
  # table of contents whose links all lead to a heading.
  text = README.read_text()
  top = "\n".join(text.splitlines()[:20])
  assert "bash scripts/main.sh" in top and "bash scripts/test.sh" in top
  contents = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
  slugs = {
    re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
    for h in re.findall(r"^#+ +(.+)$", FENCE.sub("", text), re.MULTILINE)
  }
  anchors = re.findall(r"\]\(#([^)]+)\)", contents)
  assert anchors and not [a for a in anchors if a not in slugs], slugs


def test_readme_links_lead_to_files():
  # The README routes each topic to a page of docs/ in one click: every
  # relative link must name a file of the repository (GitHub follows them;
  # the docs build checks the pages' anchors).
  text = FENCE.sub("", README.read_text())
  targets = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text)
  relative_targets = [t for t in targets if not re.match(r"[a-z]+:", t)]
  assert relative_targets
  missing = [t for t in relative_targets if not (ROOT / t).exists()]
  assert not missing, missing
  pages = {t for t in relative_targets if t.startswith("docs/")}
  assert {
    "docs/composing.md",
    "docs/optimizers.md",
    "docs/routing.md",
    "docs/sharding.md",
    "docs/reliability.md",
    "docs/performance.md",
    "docs/results.md",
    "docs/examples.md",
  } <= pages, sorted(pages)
