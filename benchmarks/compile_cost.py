"""Compile cost of one optimizer update at model scale (abstract shapes).

For LLaMA-60M- and LLaMA-1B-shaped parameter trees with `L` separate layer
leaves (or `scan`-stacked `(L, ...)` leaves), lowers and compiles
`jax.jit(opt.update)` on `jax.ShapeDtypeStruct`s (nothing is allocated) and
reports StableHLO lines, dot ops, compile time and XLA's temp and argument
memory estimates, for each optimizer against `optax.contrib.muon`.

Usage: python benchmarks/compile_cost.py [--layers 2 8 24] [--shapes 60m 1b]
  [--layouts unstacked stacked] [--optimizers NAME ...] [--merge]
  [--out benchmarks/results/compile_cost.json]

Traces with `--grouping transposes` by default: the leaf grouping that one
accelerator device runs (on a CPU backend "auto" runs each leaf alone).
Writes the JSON after every row (and a markdown table beside it, `.md`);
`--merge` keeps the rows of an earlier run that this run does not measure
again, so a grid can be filled in several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import htmuon_jax

# (d_model, d_ffn, vocab) of the LLaMA shapes used by the Muon papers.
# "tiny" is for the smoke test only.
SHAPES = {
  "60m": (512, 1376, 32000),
  "1b": (2048, 5461, 32000),
  "tiny": (32, 88, 128),
}


def optax_dimension_numbers(tree: dict[str, Any]) -> Any:
  """optax muon's matrices in `tree`: 2-D leaves, and `(L, in, out)` stacks
  as L matrices (its default would send the 3-D stacks to Adam)."""
  mdn = optax.contrib.MuonDimensionNumbers

  def rule(x: jax.ShapeDtypeStruct) -> Any:
    if x.ndim == 3:
      return mdn(reduction_axis=1, output_axis=2)
    return mdn() if x.ndim == 2 else None

  dims = jax.tree.map(rule, tree)
  if "layers" in tree:  # stacked norm gains (L, d) are not matrices
    dims["layers"]["norm"]["scale"] = None
  return dims


# name -> optimizer(tree, execution): the package's optimizers take the
# execution options (leaf grouping) as `distribute=`; optax's has none.
OPTIMIZERS: dict[
  str, Callable[[Any, htmuon_jax.Execution], optax.GradientTransformation]
] = {
  "optax.contrib.muon": lambda tree, e: optax.contrib.muon(
    0.02, muon_weight_dimension_numbers=optax_dimension_numbers(tree)
  ),
  "htmuon polynomial fast": lambda tree, e: htmuon_jax.htmuon(
    0.02, method=htmuon_jax.methods.Polynomial(precision="fast"), distribute=e
  ),
  "htmuon polynomial accurate": lambda tree, e: htmuon_jax.htmuon(
    0.02,
    method=htmuon_jax.methods.Polynomial(precision="accurate"),
    distribute=e,
  ),
  "htmuon svd": lambda tree, e: htmuon_jax.htmuon(
    0.02, method="svd", distribute=e
  ),
  "htmuon stream": lambda tree, e: htmuon_jax.htmuon(
    0.02, method="stream", distribute=e
  ),
  "htmuon_jax.muon (NS)": lambda tree, e: htmuon_jax.muon(0.02, distribute=e),
}


def llama_tree(layers: int, shape: str, stacked: bool) -> dict[str, Any]:
  """Abstract LLaMA-shaped parameters: embedding, layers, norms, head."""
  d, f, v = SHAPES[shape]
  f32 = jnp.float32
  mats = dict(
    q=(d, d), k=(d, d), v=(d, d), o=(d, d), gate=(d, f), up=(d, f), down=(f, d)
  )

  def sds(s: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(s, f32)

  tree: dict[str, Any] = {
    "embed": {"embedding": sds((v, d))},
    "head": {"kernel": sds((d, v))},
    "final_norm": {"scale": sds((d,))},
  }
  if stacked:
    block = {n: {"kernel": sds((layers,) + s)} for n, s in mats.items()}
    block["norm"] = {"scale": sds((layers, d))}
    tree["layers"] = block
  else:
    for i in range(layers):
      block = {n: {"kernel": sds(s)} for n, s in mats.items()}
      block["norm"] = {"scale": sds((d,))}
      tree[f"layer_{i}"] = block
  return tree


def measure(name: str, tree: dict[str, Any], grouping: str) -> dict[str, Any]:
  opt = OPTIMIZERS[name](tree, htmuon_jax.Execution(grouping=grouping))
  state = jax.eval_shape(opt.init, tree)
  t0 = time.perf_counter()
  lowered = jax.jit(opt.update).lower(tree, state, tree)
  lower_s = time.perf_counter() - t0
  text = lowered.as_text()
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return dict(
    optimizer=name,
    stablehlo_lines=len(text.splitlines()),
    dots=len(re.findall(r"stablehlo\.dot_general", text)),
    lower_s=lower_s,
    compile_s=compile_s,
    temp_gib=mem.temp_size_in_bytes / 2**30 if mem else None,
    argument_gib=mem.argument_size_in_bytes / 2**30 if mem else None,
  )


KEY = ("shape", "layers", "layout", "optimizer")
HEADER = (
  "| shape | layers | layout | optimizer | StableHLO lines | dots | "
  "compile s | temp GiB | args GiB |\n|---|---|---|---|---|---|---|---|---|"
)


def table_row(row: dict[str, Any]) -> str:
  return (
    f"| {row['shape']} | {row['layers']} | {row['layout']} | "
    f"{row['optimizer']} | {row['stablehlo_lines']:,} | {row['dots']} | "
    f"{row['compile_s']:.1f} | {row['temp_gib']:.2f} | "
    f"{row['argument_gib']:.2f} |"
  )


def write(out: str, rows: list[dict[str, Any]]) -> None:
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  order = lambda r: (r["shape"], r["layout"], r["layers"], r["optimizer"])
  rows = sorted(rows, key=order)
  with open(out, "w") as f:
    json.dump(
      dict(
        jax=jax.__version__,
        backend=jax.default_backend(),
        date=time.strftime("%Y-%m-%d"),
        rows=rows,
      ),
      f,
      indent=1,
    )
  with open(os.path.splitext(out)[0] + ".md", "w") as f:
    f.write(HEADER + "\n" + "\n".join(table_row(r) for r in rows) + "\n")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 24])
  parser.add_argument("--shapes", nargs="+", default=["60m", "1b"])
  parser.add_argument("--layouts", nargs="+", default=["unstacked", "stacked"])
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS))
  parser.add_argument(
    "--out", default=os.path.join("benchmarks", "results", "compile_cost.json")
  )
  parser.add_argument(
    "--grouping",
    default="transposes",
    choices=htmuon_jax.sharding._distribute.GROUPINGS,
    help="leaf grouping to trace with (default: what one accelerator "
    "device runs; 'auto' on this CPU is 'off')",
  )
  parser.add_argument(
    "--merge",
    action="store_true",
    help="keep the rows of an earlier --out that this run does not redo",
  )
  args = parser.parse_args(argv)
  unknown = set(args.optimizers) - set(OPTIMIZERS)
  if unknown:
    parser.error(f"--optimizers: unknown {sorted(unknown)}; {list(OPTIMIZERS)}")
  kept: list[dict[str, Any]] = []
  if args.merge and os.path.exists(args.out):
    with open(args.out) as f:
      kept = json.load(f)["rows"]
  rows: list[dict[str, Any]] = []
  print(HEADER)
  for shape in args.shapes:
    for layers in args.layers:
      for layout in args.layouts:
        tree = llama_tree(layers, shape, layout == "stacked")
        for name in args.optimizers:
          row = dict(shape=shape, layers=layers, layout=layout)
          row.update(measure(name, tree, args.grouping))
          rows.append(row)
          print(table_row(row), flush=True)
          done = {tuple(r[k] for k in KEY) for r in rows}
          others = [r for r in kept if tuple(r[k] for k in KEY) not in done]
          write(args.out, others + rows)


if __name__ == "__main__":
  main()
