"""Program size and compile time of one update on a mesh of 8 devices.

A transformer tree (hidden 768, MLP 3072, vocab 4096: per layer q, k, v, o,
gate, up, down kernels and two norm scales) with its kernels sharded FSDP
style (`--layouts fsdp`: fan-in axis over `fsdp=8`) or FSDP and Megatron
tensor splits (`megatron`: `fsdp=4 x tensor=2`, columns of q/k/v/gate/up and
rows of o/down over `tensor`), abstract (nothing is allocated), with
explicit and automatic mesh axes. For each optimizer and depth it lowers
and compiles `jax.jit(opt.update)` with the state placed by
`state_shardings`, and reports StableHLO lines, compile time, the compiled
step's collectives (`htmuon_jax.testing.count_collectives`) and XLA's
"Involuntary full rematerialization" warnings. `optax.contrib.muon` fails
under explicit axes (its error is recorded).

  python benchmarks/mesh_compile.py            # sets the 8-device flag itself
  python benchmarks/mesh_compile.py --layers 4 16 --layouts fsdp

Writes `benchmarks/results/mesh_compile.json` and a markdown table beside it.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=wrong-import-position
import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import htmuon_jax
from htmuon_jax import testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

HIDDEN, MLP, VOCAB = 768, 3072, 4096
E = htmuon_jax.Execution


# name -> optimizer(mesh, param shardings): the package's with a fixed
# method (rows that do not depend on the backend's "auto" choice) and weight
# decay, as in training; "stated" ones are told the params' shardings
# (`Execution.shardings`, for automatic axes).
def _ht(
  alias: Callable[..., Any],
  grouping: str,
  spread: bool = False,
  stated: bool = False,
  **kw: Any,
) -> Callable[[Any, Any], optax.GradientTransformation]:
  return lambda mesh, shardings: alias(
    0.02,
    weight_decay=0.1,
    distribute=E(
      distribute=mesh if spread else None,
      grouping=grouping,
      shardings=shardings if stated else None,
    ),
    **kw,
  )


POLY, STREAM = {"method": "polynomial"}, {"method": "stream"}
OPTIMIZERS: dict[str, Callable[[Any, Any], optax.GradientTransformation]] = {
  "optax.contrib.muon": lambda mesh, _: optax.contrib.muon(
    0.02, weight_decay=0.1
  ),
  "htmuon per leaf": _ht(htmuon_jax.htmuon, "off", **POLY),
  "htmuon shapes": _ht(htmuon_jax.htmuon, "shapes", **POLY),
  "htmuon stated shapes": _ht(htmuon_jax.htmuon, "shapes", stated=True, **POLY),
  "htmuon distribute shapes": _ht(htmuon_jax.htmuon, "shapes", True, **POLY),
  "htmuon stream shapes": _ht(htmuon_jax.htmuon, "shapes", **STREAM),
  "htmuon stream distribute": _ht(htmuon_jax.htmuon, "auto", True, **STREAM),
  "htnormuon shapes": _ht(htmuon_jax.htnormuon, "shapes", **POLY),
  "htnormuon stated shapes": _ht(
    htmuon_jax.htnormuon, "shapes", stated=True, **POLY
  ),
  "htnormuon distribute": _ht(htmuon_jax.htnormuon, "auto", True, **POLY),
}


def tree(layers: int) -> dict[str, Any]:
  """Leaf shapes of the transformer, per layer and the embedding."""
  h, f = HIDDEN, MLP
  out = {"embed": {"embedding": (VOCAB, h)}}
  for i in range(layers):
    block = {k: {"kernel": (h, h)} for k in ("q", "k", "v", "o")}
    block |= {"gate": {"kernel": (h, f)}, "up": {"kernel": (h, f)}}
    block |= {"down": {"kernel": (f, h)}}
    block |= {"norm1": {"scale": (h,)}, "norm2": {"scale": (h,)}}
    out[f"layer{i}"] = block
  return out


def spec(path: str, shape: tuple[int, ...], layout: str) -> P:
  if len(shape) == 1:
    return P()
  if layout == "fsdp" or "embed" in path:
    return P("fsdp", None)
  rows = any(k in path for k in ("'o'", "'down'"))  # row-parallel
  return P("tensor", "fsdp") if rows else P("fsdp", "tensor")


MESHES = {"fsdp": ((8,), ("fsdp",)), "megatron": ((4, 2), ("fsdp", "tensor"))}


@contextlib.contextmanager
def stderr_text(out: list[str]) -> Iterator[None]:
  """Captures what is written to file descriptor 2 (XLA's C++ log)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as f:
    os.dup2(f.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      f.seek(0)
      out.append(f.read().decode(errors="replace"))


def measure(name: str, layout: str, axes: str, layers: int) -> dict[str, Any]:
  shape, names = MESHES[layout]
  kind = AxisType.Explicit if axes == "explicit" else AxisType.Auto
  mesh = jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))
  row: dict[str, Any] = dict(
    layout=layout, axes=axes, optimizer=name, layers=layers
  )

  def sds(path: Any, s: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    sharding = NamedSharding(mesh, spec(jax.tree_util.keystr(path), s, layout))
    return jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding)

  is_shape = lambda x: (
    isinstance(x, tuple) and all(isinstance(i, int) for i in x)
  )
  params = jax.tree_util.tree_map_with_path(sds, tree(layers), is_leaf=is_shape)
  opt = OPTIMIZERS[name](mesh, jax.tree.map(lambda p: p.sharding, params))
  log: list[str] = []
  try:
    with jax.set_mesh(mesh):
      state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(opt.init, params),
        htmuon_jax.state_shardings(opt, params),
      )
      start = time.perf_counter()
      lowered = jax.jit(opt.update).lower(params, state, params)
      with stderr_text(log):
        compiled = lowered.compile()
      row["compile_s"] = round(time.perf_counter() - start, 2)
    row["lines"] = len(lowered.as_text().splitlines())
    row["collectives"] = testing.count_collectives(compiled)["total"]
  except Exception as e:  # noqa: BLE001 (recorded: optax under explicit axes)
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
  text = "".join(log)
  row["remat_warnings"] = text.count("Involuntary full rematerialization")
  return row


def markdown(rows: list[dict[str, Any]], layers: list[int]) -> str:
  lo, hi = min(layers), max(layers)
  head = (
    f"| layout | axes | optimizer | lines {lo} / {hi} layers | ratio "
    f"| compile {lo} / {hi} layers (s) | collectives at {hi} "
    "| remat warnings |"
  )
  out = [head, "|---|---|---|---|---|---|---|---|"]
  by = {(r["layout"], r["axes"], r["optimizer"], r["layers"]): r for r in rows}
  seen = []
  for r in rows:
    key = (r["layout"], r["axes"], r["optimizer"])
    if key not in seen:
      seen.append(key)
  for key in seen:
    a, b = by.get(key + (lo,)), by.get(key + (hi,))
    if a is None or b is None:
      continue
    if "error" in a or "error" in b:
      err = (a.get("error") or b.get("error")).split(":")[0]
      out.append(f"| {key[0]} | {key[1]} | {key[2]} | fails: {err} | | | | |")
      continue
    coll = ", ".join(f"{k} {v}" for k, v in b["collectives"].items() if v)
    out.append(
      f"| {key[0]} | {key[1]} | {key[2]} | {a['lines']:,} / {b['lines']:,} "
      f"| {b['lines'] / a['lines']:.2f}x | {a['compile_s']:.1f} / "
      f"{b['compile_s']:.1f} | {coll or 'none'} "
      f"| {a['remat_warnings']} / {b['remat_warnings']} |"
    )
  return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[4, 16])
  parser.add_argument(
    "--layouts", nargs="+", default=list(MESHES), choices=list(MESHES)
  )
  parser.add_argument(
    "--axes",
    nargs="+",
    default=["explicit", "auto"],
    choices=["explicit", "auto"],
  )
  parser.add_argument(
    "--optimizers",
    nargs="+",
    default=list(OPTIMIZERS),
    choices=list(OPTIMIZERS),
  )
  parser.add_argument("--out", default=None)
  parser.add_argument(
    "--merge",
    action="store_true",
    help="keep the rows of an earlier run (--out) that this run does not measure",
  )
  args = parser.parse_args(argv)
  if jax.device_count() != 8:
    raise SystemExit("mesh_compile: needs 8 devices (run it as a script).")
  rows = []
  for layout in args.layouts:
    for axes in args.axes:
      for name in args.optimizers:
        for layers in args.layers:
          row = measure(name, layout, axes, layers)
          print(row, flush=True)
          rows.append(row)
  path = args.out or str(_common.RESULTS / "mesh_compile.json")
  if args.merge and os.path.exists(path):
    with open(path) as f:
      kept = json.load(f)["rows"]
    key = lambda r: (r["layout"], r["axes"], r["optimizer"], r["layers"])
    new = {key(r): r for r in rows}
    rows = [new.pop(key(r), r) for r in kept] + list(new.values())
  payload = {"machine": _common.machine(), "args": vars(args), "rows": rows}
  _common.write("mesh_compile", payload, markdown(rows, args.layers), args.out)


if __name__ == "__main__":
  main()
