"""Helpers for tests and benchmarks: `count_collectives` reads compiled XLA
programs (nothing in an update uses it)."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["COLLECTIVES", "count_collectives"]

COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "all-to-all",
  "reduce-scatter",
  "collective-permute",
)
# `%name = <shape> op(...)`; the op is the first ` word(` after the `=`
# (tuple shapes contain spaces and `/*index=5*/` comments, never ` word(`).
_INSTR = re.compile(
  r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][a-z0-9\-]*)\("
)
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(
  r"(?:body|condition|to_apply|calls|branch_computations)=\{?([%\w.\-, ]+)"
)


def count_collectives(compiled: Any) -> dict[str, dict[str, int]]:
  """Counts the collectives of a compiled XLA program, in and out of loops.

  Args:
    compiled: a `jax.stages.Compiled` (`jax.jit(f).lower(...).compile()`) or
      its HLO text.

  Returns:
    `{"total": {op: n}, "in_loop": {op: n}}` for the ops in `COLLECTIVES`
    (async `*-start` forms count once); `in_loop` counts those in the body or
    condition of a `while` loop, or in computations these call.
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  ops: dict[str, list[str]] = {}
  callees: dict[str, set[str]] = {}
  loop_roots: set[str] = set()
  current = None
  for line in text.splitlines():
    head = _COMPUTATION.match(line)
    if head and "=" not in line.split("{")[0]:
      current = head.group(1)
      ops.setdefault(current, [])
      callees.setdefault(current, set())
      continue
    match = _INSTR.match(line)
    if current is None or not match:
      continue
    op = match.group(1)
    op = op[: -len("-start")] if op.endswith("-start") else op
    ops[current].append(op)
    for group in _CALLEE.findall(line):
      names = {n.strip().lstrip("%") for n in group.split(",") if n.strip()}
      callees[current] |= names
      if op == "while":
        loop_roots |= names
  in_loop, todo = set(), list(loop_roots)
  while todo:
    name = todo.pop()
    if name not in in_loop:
      in_loop.add(name)
      todo.extend(callees.get(name, ()))

  def tally(names: Any) -> dict[str, int]:
    return {c: sum(ops.get(n, []).count(c) for n in names) for c in COLLECTIVES}

  return {"total": tally(ops), "in_loop": tally(in_loop)}
