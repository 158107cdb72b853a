"""Sharded htmuon step: naive GSPMD vs the distributed spectral step.

LLaMA-60M-shaped parameters (hidden 512, intermediate 1376, 8 layers stacked
as by `nnx.scan`, vocab 32000; embedding and LM head are matrices, as in the
HTMuon authors' runs), sharded FSDP-style over 8 forced CPU devices (fan-in
axis over `fsdp`). For each method: the step time (jitted `htmuon` update +
apply, median of `--reps` runs after a warm-up) and the collectives of the
compiled HLO, and how many of them sit inside a `while` loop.

  python benchmarks/sharded_step.py            # sets the 8-device flag itself
  python benchmarks/sharded_step.py --methods stream   # the streaming basis

With `--tables memory` (or `timing memory`) it also measures optimizer-state
memory: for every alias and method, the state's bytes per device (summed
over each device's addressable shards of the state made by a jitted
`opt.init` with `state_shardings`), against the params' bytes per device and
the whole (unsharded) state, and the collectives of the compiled distributed
step (compiled only, not run):

  python benchmarks/sharded_step.py --tables memory

Prints markdown tables and writes `benchmarks/results/sharded_step.json`.
On a CPU host the 8 "devices" share the host's cores, so the time measures
the total work of all devices: naive GSPMD makes every device decompose every
matrix, the distributed step gives each device 1/8 of them.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

# pylint: disable=wrong-import-position
import argparse
import inspect
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import htmuon_jax
from htmuon_jax import sharding as sh
from htmuon_jax import testing

MDN = htmuon_jax.MuonDimensionNumbers


def llama_params(hidden: int, inter: int, layers: int, vocab: int):
  """Shapes, FSDP specs and dimension numbers of a scanned LLaMA."""
  h, i, n = hidden, inter, layers
  stacked = {
    "q": (n, h, h),
    "k": (n, h, h),
    "v": (n, h, h),
    "o": (n, h, h),
    "gate": (n, h, i),
    "up": (n, h, i),
    "down": (n, i, h),
  }
  shapes = {
    "embed": (vocab, h),
    "lm_head": (h, vocab),
    "final_norm": (h,),
    "layers": {**stacked, "attn_norm": (n, h), "mlp_norm": (n, h)},
  }
  specs = {
    "embed": P("fsdp", None),
    "lm_head": P("fsdp", None),
    "final_norm": P(),
    "layers": {
      **{k: P(None, "fsdp", None) for k in stacked},
      "attn_norm": P(),
      "mlp_norm": P(),
    },
  }
  dims = {
    "embed": MDN(),
    "lm_head": MDN(),
    "final_norm": None,
    "layers": {
      **{k: MDN(1, 2) for k in stacked},
      "attn_norm": None,
      "mlp_norm": None,
    },
  }
  return shapes, specs, dims


def bench(method: str, distribute, shapes, specs, dims, mesh, reps: int):
  power = 0.0 if method == "newton_schulz" else 0.125
  opt = htmuon_jax.htmuon(
    0.03,
    power,
    method=method,
    weight_decay=0.1,
    muon_weight_dimension_numbers=dims,
    distribute=distribute,
  )
  shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  key = iter(jax.random.split(jax.random.key(0), 64))
  params = jax.tree.map(
    lambda s, sd: jax.device_put(jax.random.normal(next(key), s), sd),
    shapes,
    shard,
    is_leaf=lambda x: isinstance(x, tuple),
  )
  grads = jax.tree.map(lambda p: p * 0.01 + 1e-3, params)
  state_shard = sh.state_shardings(opt, params)
  state = jax.jit(opt.init, out_shardings=state_shard)(params)

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  t0 = time.perf_counter()
  compiled = (
    jax.jit(
      step,
      in_shardings=(shard, state_shard, shard),
      out_shardings=(shard, state_shard),
      donate_argnums=(0, 1),
    )
    .lower(params, state, grads)
    .compile()
  )
  compile_s = time.perf_counter() - t0
  counts = testing.count_collectives(compiled)
  params, state = jax.block_until_ready(compiled(params, state, grads))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    params, state = jax.block_until_ready(compiled(params, state, grads))
    times.append(time.perf_counter() - t0)
  return {
    "method": method,
    "mode": "naive" if distribute is None else "distributed",
    "step_s_median": statistics.median(times),
    "step_s": times,
    "compile_s": compile_s,
    "collectives": counts["total"],
    "collectives_in_loop": counts["in_loop"],
  }


ALIASES = tuple(htmuon_jax.ALIASES)


def bytes_per_device(tree) -> int:
  """The largest, over devices, of the bytes of `tree`'s shards they hold."""
  per_device: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = (
        per_device.get(shard.device, 0) + shard.data.nbytes
      )
  return max(per_device.values())


def memory_row(alias: str, method, shapes, specs, dims, mesh):
  """State bytes per device and collectives of the distributed step."""
  fn = getattr(htmuon_jax, alias)
  kwargs = {"muon_weight_dimension_numbers": dims}
  if method is not None:
    kwargs["method"] = method
  if "distribute" in inspect.signature(fn).parameters:
    kwargs["distribute"] = mesh
  if method == "newton_schulz" and "power" in inspect.signature(fn).parameters:
    kwargs["power"] = 0.0  # Newton-Schulz is U V^T only.
  opt = fn(0.03, **kwargs)
  shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  abstract = jax.tree.map(
    lambda s, sd: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sd),
    shapes,
    shard,
    is_leaf=lambda x: isinstance(x, tuple),
  )
  params = jax.jit(
    lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract),
    out_shardings=shard,
  )()
  state_shard = sh.state_shardings(opt, params)
  state = jax.jit(opt.init, out_shardings=state_shard)(params)
  unsharded = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  state_dev = bytes_per_device(state)
  params_dev = bytes_per_device(params)
  abstract_state = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
  )
  del state, params

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = (
    jax.jit(
      step,
      in_shardings=(shard, state_shard, shard),
      out_shardings=(shard, state_shard),
      donate_argnums=(0, 1),
    )
    .lower(abstract, abstract_state, abstract)
    .compile()
  )
  counts = testing.count_collectives(compiled)
  return {
    "alias": alias,
    "method": method or "-",
    "distributed": "distribute" in kwargs,
    "state_bytes_per_device": state_dev,
    "params_bytes_per_device": params_dev,
    "state_bytes_unsharded": unsharded,
    "devices": len(mesh.devices.flat),
    "collectives": counts["total"],
    "collectives_in_loop": counts["in_loop"],
  }


def print_memory(rows: list) -> None:
  names = ("all-reduce", "all-gather", "all-to-all", "collective-permute")
  print(
    "\n| alias | method | state / device (MB) | params / device (MB) "
    "| state unsharded (MB) | state / device x devices / unsharded | "
    + " | ".join(names)
    + " |"
  )
  print("|---|---|---|---|---|---|" + "---|" * len(names))
  mb = 2**20
  for r in rows:
    ratio = (
      r["state_bytes_per_device"] * r["devices"] / r["state_bytes_unsharded"]
    )
    print(
      f"| {r['alias']} | {r['method']} | "
      f"{r['state_bytes_per_device'] / mb:.2f} | "
      f"{r['params_bytes_per_device'] / mb:.2f} | "
      f"{r['state_bytes_unsharded'] / mb:.2f} | {ratio:.4f} | "
      + " | ".join(str(r["collectives"][n]) for n in names)
      + " |"
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument(
    "--methods",
    nargs="+",
    default=None,
    help="htmuon methods to time: any of htmuon_jax.methods.method_names() or "
    "'stream' (default: polynomial newton_schulz)",
  )
  parser.add_argument(
    "--modes",
    nargs="+",
    default=["naive", "distributed"],
    choices=["naive", "distributed"],
    help="naive GSPMD and/or the distributed spectral step",
  )
  parser.add_argument(
    "--tables",
    nargs="+",
    default=["timing"],
    choices=["timing", "memory"],
    help="timing: step times of --methods; memory: state bytes per device "
    "for --aliases x --memory-methods",
  )
  parser.add_argument(
    "--aliases",
    nargs="+",
    default=list(ALIASES),
    help="aliases of the memory table",
  )
  parser.add_argument(
    "--memory-methods",
    nargs="+",
    default=None,
    help="methods of the memory table (default: every method of "
    "htmuon_jax.methods.method_names(stateful=False) but 'auto', and 'stream')",
  )
  parser.add_argument(
    "--out",
    default=None,
    help="JSON output (default: benchmarks/results/sharded_step.json, or "
    "sharded_memory.json for --tables memory alone)",
  )
  args = parser.parse_args()
  if args.out is None:
    name = (
      "sharded_step.json" if "timing" in args.tables else "sharded_memory.json"
    )
    args.out = str(pathlib.Path(__file__).parent / "results" / name)
  methods = args.methods or [
    "polynomial",
    "newton_schulz",
  ]
  mesh = jax.make_mesh((8,), ("fsdp",))
  shapes, specs, dims = llama_params(512, 1376, args.layers, args.vocab)
  rows, memory = [], []

  def write(rows: list) -> None:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
      json.dumps(
        {
          "config": {
            "model": "LLaMA-60M shapes",
            "layers": args.layers,
            "vocab": args.vocab,
            "devices": jax.device_count(),
            "mesh": "8 (fsdp)",
            "reps": args.reps,
            "jax": jax.__version__,
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
          },
          "rows": rows,
          "memory": memory,
        },
        indent=2,
      )
    )

  if "memory" in args.tables:
    memory_methods = args.memory_methods or [
      m for m in htmuon_jax.methods.method_names(stateful=False) if m != "auto"
    ] + ["stream"]
    for alias in args.aliases:
      has_method = (
        "method" in inspect.signature(getattr(htmuon_jax, alias)).parameters
      )
      for method in memory_methods if has_method else [None]:
        row = memory_row(alias, method, shapes, specs, dims, mesh)
        memory.append(row)
        print(json.dumps(row), flush=True)
        write(rows)

  for method in methods if "timing" in args.tables else []:
    for mode in args.modes:
      distribute = None if mode == "naive" else mesh
      row = bench(method, distribute, shapes, specs, dims, mesh, args.reps)
      rows.append(row)
      print(json.dumps(row), flush=True)
      write(rows)  # After each row: a long run keeps what it measured.

  if memory:
    print_memory(memory)
  names = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter")
  if rows:
    print_timing(rows, names)
  print(f"\nwrote {args.out}")


def print_timing(rows: list, names: tuple) -> None:
  print(
    "\n| method | mode | step (s, median) | "
    + " | ".join(names)
    + " | in while loop |"
  )
  print("|---|---|---|" + "---|" * len(names) + "---|")
  for r in rows:
    print(
      f"| {r['method']} | {r['mode']} | {r['step_s_median']:.3f} | "
      + " | ".join(str(r["collectives"][n]) for n in names)
      + f" | {sum(r['collectives_in_loop'].values())} |"
    )


if __name__ == "__main__":
  main()
