"""Griffe extension (docs site): docstrings' `.. math::` blocks as `$$` math.

The docstrings write display math as reStructuredText's `.. math::`
directive (as optax and jax do), which reads as plain TeX in `help()`.
mkdocstrings parses them as Google-style Markdown, where the directive
would show raw; this extension rewrites each block, when the docs are
built, into a `$$ ... $$` block that `pymdownx.arithmatex` marks up and
MathJax renders (mkdocs.yml). The sources are not changed.
"""

import re
import textwrap
from typing import Any

import griffe

# The directive, then its body: the following indented, non-blank lines.
MATH = re.compile(
  r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:(?P=indent)[ \t]+\S.*(?:\n|$))+)",
  re.MULTILINE,
)


def rst_math_to_dollars(text: str) -> str:
  """`.. math::` blocks of a docstring as `$$` blocks, same indentation."""

  def block(match: re.Match) -> str:
    indent = match.group("indent")
    body = textwrap.dedent(match.group("body")).strip()
    lines = ["$$", *body.splitlines(), "$$"]
    return "".join(f"{indent}{line}\n" for line in lines)

  return MATH.sub(block, text)


class RstMath(griffe.Extension):
  """Rewrites `.. math::` blocks of every loaded object's docstring."""

  def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
    del kwargs  # unused
    if obj.docstring is not None and ".. math::" in obj.docstring.value:
      obj.docstring.value = rst_math_to_dollars(obj.docstring.value)
