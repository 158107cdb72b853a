"""One jitted optimizer update over the weight matrices of LLaMA-60M/135M.

Parameters (zeros) and gradients (Gaussian) with the shapes of LLaMA blocks
(`../shared/README.md`): per layer q, k, v, o (`h x h`), gate and up
(`h x i`), down (`i x h`), and two RMSNorm gains (`h`, to AdamW). The token
embedding and LM head (`32000 x h`) are left out by default (the
conventional split sends them to AdamW; `--with-embeddings` includes them as
matrices, as the HTMuon authors do). Optimizers: `htmuon` (p = 0.125) with
each spectral method, `optax.contrib.muon` and `optax.adamw`. Reports the
median time per update after warm-up, XLA's peak-memory estimate for the
compiled update (`compiled.memory_analysis()`: arguments + outputs +
temporaries; it works on every backend), and the time ratio to
`optax.contrib.muon` measured in the same run.

Usage:
  python benchmarks/optimizer_step.py [--quick] [--layers N] [--repeats 3]

Prints a markdown table and writes `benchmarks/results/optimizer_step.json`
(and `.md`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402

import htmuon_jax  # noqa: E402

MODELS = {
  "llama-60m": dict(hidden=512, intermediate=1376, layers=8, vocab=32000),
  "llama-135m": dict(hidden=768, intermediate=2048, layers=12, vocab=32000),
  "tiny": dict(hidden=16, intermediate=32, layers=1, vocab=100),
}
POWER = 0.125


def model_params(cfg: dict, layers: int, with_embeddings: bool) -> dict:
  h, i = cfg["hidden"], cfg["intermediate"]
  params = {}
  for l in range(layers):
    params[f"layer{l}"] = {
      "q": (h, h),
      "k": (h, h),
      "v": (h, h),
      "o": (h, h),
      "gate": (h, i),
      "up": (h, i),
      "down": (i, h),
      "attn_norm": (h,),
      "mlp_norm": (h,),
    }
  if with_embeddings:
    params["embed"] = (cfg["vocab"], h)
    params["lm_head"] = (h, cfg["vocab"])
  return jax.tree.map(
    lambda s: jnp.zeros(s, jnp.float32),
    params,
    is_leaf=lambda x: isinstance(x, tuple),
  )


def optimizers(fast: bool = False) -> dict:
  opts = {
    f"htmuon-{m}": htmuon_jax.htmuon(0.03, POWER, method=m)
    for m in ("svd", "eigh", "polynomial")
  }
  if fast:  # precision="fast": bf16-operand products (accelerator runs).
    opts["htmuon-polynomial-fast"] = htmuon_jax.htmuon(
      0.03, POWER, method=htmuon_jax.methods.Polynomial(precision="fast")
    )
    opts["muon-newton_schulz-fast"] = htmuon_jax.htmuon(
      0.01, 0.0, method=htmuon_jax.methods.NewtonSchulz(precision="fast")
    )
  opts["optax.contrib.muon"] = optax.contrib.muon(0.01)
  opts["optax.adamw"] = optax.adamw(1e-3)
  return opts


def measure(opt, params, grads, repeats: int) -> tuple[float, float]:
  state = opt.init(params)
  step = jax.jit(opt.update)
  compiled = step.lower(grads, state, params).compile()
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    )
  t = _common.time_fn(compiled, grads, state, params, repeats=repeats)
  return t, peak


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--quick",
    action="store_true",
    help="a tiny model, one repeat: a smoke test",
  )
  parser.add_argument("--models", default="llama-60m,llama-135m")
  parser.add_argument(
    "--layers",
    type=int,
    default=None,
    help="transformer blocks per model (default: all)",
  )
  parser.add_argument("--with-embeddings", action="store_true")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
    "--fast", action="store_true", help='also the precision="fast" optimizers'
  )
  parser.add_argument(
    "--methods", default=None, help="comma-separated subset of the optimizers"
  )
  parser.add_argument("--out", default=None, help="JSON path")
  args = parser.parse_args(argv)
  models = ["tiny"] if args.quick else args.models.split(",")
  repeats = 1 if args.quick else args.repeats
  rows = []
  for name in models:
    cfg = MODELS[name]
    layers = args.layers or cfg["layers"]
    params = model_params(cfg, layers, args.with_embeddings)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 1000))
    grads = jax.tree.map(
      lambda p: jax.random.normal(next(keys), p.shape), params
    )
    n_params = sum(p.size for p in jax.tree.leaves(params))
    for opt_name, opt in optimizers(args.fast).items():
      if args.methods and opt_name not in args.methods.split(",") + [
        "optax.contrib.muon"
      ]:
        continue
      t, peak = measure(opt, params, grads, repeats)
      rows.append(
        dict(
          model=name,
          layers=layers,
          params=int(n_params),
          optimizer=opt_name,
          time_ms=1e3 * t,
          peak_mib=None if peak is None else peak / 2**20,
        )
      )
      print(f"{name} x{layers} {opt_name:>20}: {1e3 * t:9.1f} ms", flush=True)
  base = {
    r["model"]: r["time_ms"]
    for r in rows
    if r["optimizer"] == "optax.contrib.muon"
  }
  for r in rows:
    r["ratio_to_optax_muon"] = r["time_ms"] / base[r["model"]]
  lines = [
    "| model | blocks | params | optimizer | ms / step | peak MiB "
    "(XLA estimate) | vs optax muon |",
    "|---|---:|---:|---|---:|---:|---:|",
  ]
  for r in rows:
    peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
    lines.append(
      f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.1f}M | "
      f"{r['optimizer']} | {r['time_ms']:.0f} | {peak} | "
      f"{r['ratio_to_optax_muon']:.2f} |"
    )
  payload = dict(
    machine=_common.machine(),
    power=POWER,
    repeats=repeats,
    quick=args.quick,
    with_embeddings=args.with_embeddings,
    rows=rows,
  )
  _common.write(
    "optimizer_step" + ("_quick" if args.quick else ""),
    payload,
    "\n".join(lines),
    args.out,
  )


if __name__ == "__main__":
  main()
