"""Sharded htmuon step: naive GSPMD vs the distributed spectral step.

LLaMA-60M-shaped parameters (hidden 512, intermediate 1376, 8 layers stacked
as by `nnx.scan`, vocab 32000; embedding and LM head are matrices, as in the
HTMuon authors' runs), sharded FSDP-style over 8 forced CPU devices (fan-in
axis over `fsdp`). For each method: the step time (jitted `htmuon` update +
apply, median of `--reps` runs after a warm-up) and the collectives of the
compiled HLO, and how many of them sit inside a `while` loop.

  python benchmarks/sharded_step.py            # sets the 8-device flag itself
  python benchmarks/sharded_step.py --methods stream   # the streaming basis

Prints a markdown table and writes `benchmarks/results/sharded_step.json`.
On a CPU host the 8 "devices" share the host's cores, so the time measures
the total work of all devices: naive GSPMD makes every device decompose every
matrix, the distributed step gives each device 1/8 of them.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

# pylint: disable=wrong-import-position
import argparse
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

MDN = htmuon_jax.MuonDimensionNumbers


def llama_params(hidden: int, inter: int, layers: int, vocab: int):
  """Shapes, FSDP specs and dimension numbers of a scanned LLaMA."""
  h, i, n = hidden, inter, layers
  stacked = {"q": (n, h, h), "k": (n, h, h), "v": (n, h, h), "o": (n, h, h),
             "gate": (n, h, i), "up": (n, h, i), "down": (n, i, h)}
  shapes = {"embed": (vocab, h), "lm_head": (h, vocab), "final_norm": (h,),
            "layers": {**stacked, "attn_norm": (n, h), "mlp_norm": (n, h)}}
  specs = {"embed": P("fsdp", None), "lm_head": P("fsdp", None),
           "final_norm": P(),
           "layers": {**{k: P(None, "fsdp", None) for k in stacked},
                      "attn_norm": P(), "mlp_norm": P()}}
  dims = {"embed": MDN(), "lm_head": MDN(), "final_norm": None,
          "layers": {**{k: MDN(1, 2) for k in stacked},
                     "attn_norm": None, "mlp_norm": None}}
  return shapes, specs, dims


def bench(method: str, distribute, shapes, specs, dims, mesh, reps: int):
  power = 0.0 if method == "newton_schulz" else 0.125
  opt = htmuon_jax.htmuon(0.03, power, method=method, weight_decay=0.1,
                          muon_weight_dimension_numbers=dims,
                          distribute=distribute)
  shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  key = iter(jax.random.split(jax.random.key(0), 64))
  params = jax.tree.map(
      lambda s, sd: jax.device_put(jax.random.normal(next(key), s), sd),
      shapes, shard, is_leaf=lambda x: isinstance(x, tuple))
  grads = jax.tree.map(lambda p: p * 0.01 + 1e-3, params)
  state_shard = sh.state_shardings(opt, params)
  state = jax.jit(opt.init, out_shardings=state_shard)(params)

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  t0 = time.perf_counter()
  compiled = jax.jit(
      step, in_shardings=(shard, state_shard, shard),
      out_shardings=(shard, state_shard), donate_argnums=(0, 1),
  ).lower(params, state, grads).compile()
  compile_s = time.perf_counter() - t0
  counts = sh.count_collectives(compiled)
  params, state = jax.block_until_ready(compiled(params, state, grads))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    params, state = jax.block_until_ready(compiled(params, state, grads))
    times.append(time.perf_counter() - t0)
  return {"method": method,
          "mode": "naive" if distribute is None else "distributed",
          "step_s_median": statistics.median(times), "step_s": times,
          "compile_s": compile_s, "collectives": counts["total"],
          "collectives_in_loop": counts["in_loop"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument(
      "--methods", nargs="+", default=None,
      help="htmuon methods to time: any of htmuon_jax.spectral.METHODS or "
      "'stream' (default: polynomial newton_schulz)")
  parser.add_argument(
      "--modes", nargs="+", default=["naive", "distributed"],
      choices=["naive", "distributed"],
      help="naive GSPMD and/or the distributed spectral step")
  parser.add_argument("--out", default=str(
      pathlib.Path(__file__).parent / "results" / "sharded_step.json"))
  args = parser.parse_args()
  methods = args.methods or [
      "polynomial" if "polynomial" in htmuon_jax.spectral.METHODS else "eigh",
      "newton_schulz"]
  mesh = jax.make_mesh((8,), ("fsdp",))
  shapes, specs, dims = llama_params(512, 1376, args.layers, args.vocab)
  rows = []

  def write(rows: list) -> None:
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": {"model": "LLaMA-60M shapes", "layers": args.layers,
                   "vocab": args.vocab, "devices": jax.device_count(),
                   "mesh": "8 (fsdp)", "reps": args.reps,
                   "jax": jax.__version__, "cpu_count": os.cpu_count(),
                   "machine": platform.machine()},
        "rows": rows}, indent=2))

  for method in methods:
    for mode in args.modes:
      distribute = None if mode == "naive" else mesh
      row = bench(method, distribute, shapes, specs, dims, mesh, args.reps)
      rows.append(row)
      print(json.dumps(row), flush=True)
      write(rows)  # After each row: a long run keeps what it measured.

  names = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter")
  print("\n| method | mode | step (s, median) | "
        + " | ".join(names) + " | in while loop |")
  print("|---|---|---|" + "---|" * len(names) + "---|")
  for r in rows:
    print(f"| {r['method']} | {r['mode']} | {r['step_s_median']:.3f} | "
          + " | ".join(str(r["collectives"][n]) for n in names)
          + f" | {sum(r['collectives_in_loop'].values())} |")
  print(f"\nwrote {args.out}")


if __name__ == "__main__":
  main()
