"""Runs every ```python code block of README.md, as a reader would.

Each block must run on its own (its imports and data included), in a fresh
namespace. The fence's info string may carry words after `python`:

* `devices=N`: the block runs in a subprocess on N forced CPU devices
  (`XLA_FLAGS=--xla_force_host_platform_device_count=N`), e.g. sharding.
* `subprocess`: the block runs in a subprocess (one CPU device), for blocks
  that change global JAX configuration.
* `no-run`: the block is deliberately not run (say why in the README text).

Other blocks are executed in the test process. New blocks are picked up
automatically; GitHub renders `python devices=8` as Python.
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
PYTHON_LANGS = ("python", "py", "python3")
OPTIONS = ("no-run", "subprocess")
# A fenced block, possibly indented (e.g. in a list item): indent, info, body.
FENCE = re.compile(
  r"^([ \t]*)```([^\n`]*)\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL
)
TIMEOUT_S = 600


class Block(NamedTuple):
  line: int  # 1-based line of the opening fence
  section: str  # the nearest heading above it
  options: tuple[str, ...]
  source: str


def python_blocks(text: str) -> list[Block]:
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
        line=before.count("\n") + 1,
        section=headings[-1] if headings else "",
        options=tuple(info[1:]),
        source=textwrap.dedent(match.group(3)),
      )
    )
  return blocks


def block_id(block: Block) -> str:
  slug = re.sub(r"[^a-z0-9]+", "-", block.section.lower()).strip("-")
  return f"{slug}-line{block.line}"


BLOCKS = python_blocks(README.read_text())


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


def test_readme_has_the_documented_blocks():
  # Quickstart, NNX, sharding and flax_dimension_numbers at least.
  assert len(BLOCKS) >= 4, [block_id(b) for b in BLOCKS]
  assert any(device_count(b) == 8 for b in BLOCKS)


def known_option(option: str) -> bool:
  return (
    option in OPTIONS
    or re.fullmatch(r"devices=[1-9][0-9]*", option) is not None
  )


@pytest.mark.parametrize("block", BLOCKS, ids=block_id)
def test_block_options_are_known(block):
  unknown = [o for o in block.options if not known_option(o)]
  assert not unknown, f"README.md:{block.line}: unknown fence options {unknown}"


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
  # Blank lines first, so tracebacks point at README.md line numbers.
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
    f"README.md:{block.line} failed\n{proc.stdout[-5000:]}"
    f"{proc.stderr[-10000:]}"
  )


def check_quickstart(namespace: dict) -> None:
  # The quickstart trains a small MLP on a learnable toy task: its loss must
  # fall well below the initial value (chance level is ln 10 = 2.3; the
  # block's 100 steps went from 2.59 to 0.27).
  final = float(namespace["loss_fn"](namespace["params"], namespace["batch"]))
  initial = float(namespace["initial"])
  assert final < 0.5 * initial, (initial, final)


# Extra checks on what the first block of a section leaves in its namespace.
CHECKS = {"Quickstart": check_quickstart}


def first_of_section(block: Block) -> bool:
  return block == next(b for b in BLOCKS if b.section == block.section)


def test_checked_sections_exist():
  sections = {b.section for b in BLOCKS}
  assert set(CHECKS) <= sections, sorted(sections)


# `no-run` blocks are deliberately left out (the README says why).
@pytest.mark.parametrize(
  "block", [b for b in BLOCKS if "no-run" not in b.options], ids=block_id
)
def test_readme_block_runs(block, capsys):
  devices = device_count(block)
  if devices is not None or "subprocess" in block.options:
    run_in_subprocess(block, devices)
    return
  namespace = {"__name__": "__readme__"}
  # Blank lines first, so tracebacks point at README.md line numbers.
  code = compile("\n" * block.line + block.source, str(README), "exec")
  exec(code, namespace)  # pylint: disable=exec-used
  capsys.readouterr()  # the blocks print; keep the test log short
  if block.section in CHECKS and first_of_section(block):
    CHECKS[block.section](namespace)


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
