"""Estimated accelerator cost of the spectral step, read from its HLO.

For each method and precision the spectral step (`spectral_power` on the
matrices of a shape set, or optax's / this package's Newton-Schulz) is
lowered with `jax.jit(...).lower(...)`, and every dot of the HLO module is
read: its shape and contracting dimensions (FLOPs = 2 x output size x
contracted size), its operand dtype and its precision config, also inside
called computations, conditionals (the costlier branch) and while loops
(times the trip count, read from the loop condition's `compare(i, constant)`
with the counter starting at 0, as `lax.fori_loop` lowers). The module is
read as lowered for the compiler, before backend passes: a CPU compilation
upcasts bf16 dots to f32, which would hide what an accelerator runs.

Compute-bound time from published dense peak rates (estimates, not
measurements; memory traffic, launch overheads and the solver kernels of
`svd`/`eigh` are not modelled, so those methods are left out):

* H100 SXM: bf16 operands 989 TFLOP/s; f32 at DEFAULT or HIGH runs as TF32,
  495 TFLOP/s; f32 at HIGHEST as plain fp32, 67 TFLOP/s.
* TPU v5p: 459 bf16 TFLOP/s; an f32 dot costs 1 bf16 pass at DEFAULT, 3 at
  HIGH, 6 at HIGHEST.

Each figure is a ratio to `optax.contrib.muon`'s Newton-Schulz (its own
`orthogonalize_via_newton_schulz`, through `htmuon_jax.testing`, 5
steps, float32 input, default precision) on the same shapes. Beside them:
CPU wall-clock ratios to the same baseline, measured on this machine
(`--cpu-shapes`, small sets only: a CPU takes minutes per 4096^2 step).

Shape sets: square 1024^2, 2048^2, 4096^2; LLaMA-60M (hidden 512,
intermediate 1376, 8 layers, vocab 32000) and LLaMA-1B (hidden 2048,
intermediate 5461, 24 layers, vocab 32000): every attention and MLP matrix
plus the embedding and LM head (the HTMuon authors' split sends every >= 2-D
weight to the spectral optimizer); matrices of one shape form a batch.

Usage:
  python benchmarks/accelerator_cost.py [--quick] [--power 0.125]

Prints a markdown table and writes `benchmarks/results/accelerator_cost.json`
(and `.md`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import math
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402
import authors_ns  # noqa: E402

import htmuon_jax  # noqa: E402
from htmuon_jax import testing as optax_compat  # noqa: E402

# Published dense peak rates, FLOP/s.
H100 = {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}
TPU_V5P = 459e12
TPU_PASSES = {"default": 1, "high": 3, "highest": 6}


def llama_set(hidden: int, inter: int, layers: int, vocab: int) -> dict:
  """{matrix shape: count} of a LLaMA model (authors' split)."""
  return {
    (hidden, hidden): 4 * layers,
    (inter, hidden): 3 * layers,
    (vocab, hidden): 2,
  }


SHAPE_SETS = {
  "1024^2": {(1024, 1024): 1},
  "2048^2": {(2048, 2048): 1},
  "4096^2": {(4096, 4096): 1},
  "768x3072": {(768, 3072): 1},
  "LLaMA-60M": llama_set(512, 1376, 8, 32000),
  "LLaMA-1B": llama_set(2048, 5461, 24, 32000),
}
QUICK_SETS = {"tiny": {(32, 32): 2, (48, 32): 1}}


def _optax_ns(x: jax.Array) -> jax.Array:
  fn = functools.partial(
    optax_compat.orthogonalize_via_newton_schulz,
    ns_coeffs=jnp.asarray(
      inspect.signature(optax.contrib.muon).parameters["ns_coeffs"].default
    ),
    ns_steps=5,
  )
  for _ in range(x.ndim - 2):
    fn = jax.vmap(fn)
  return fn(x)


def methods(power: float) -> dict:
  """name -> (fn of one batch of matrices, power used)."""
  sp = lambda method, prec, p: (
    lambda x: htmuon_jax.spectral_power(
      x,
      p,
      method=(
        dataclasses.replace(
          htmuon_jax.methods.get_method(method), precision=prec
        )
        if hasattr(htmuon_jax.methods.get_method(method), "precision")
        else method
      ),
    )
  )
  return {
    "optax muon NS5 (baseline)": (_optax_ns, 0.0),
    "newton_schulz accurate": (sp("newton_schulz", "accurate", 0.0), 0.0),
    "newton_schulz fast": (sp("newton_schulz", "fast", 0.0), 0.0),
    "polynomial accurate": (sp("polynomial", "accurate", power), power),
    "polynomial fast": (sp("polynomial", "fast", power), power),
    "polynomial fast p=0": (sp("polynomial", "fast", 0.0), 0.0),
    "express accurate": (sp("express", "accurate", power), power),
    "express fast": (sp("express", "fast", power), power),
    "express fast p=0": (sp("express", "fast", 0.0), 0.0),
    "authors' NS": (lambda x: authors_ns.authors_ns(x, power), power),
  }


# --- HLO reading -------------------------------------------------------------

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_DOT = re.compile(r"\sdot\(%?([\w.\-]+),\s*%?([\w.\-]+)\)")


def _dims(attr: str, line: str) -> list[int]:
  m = re.search(attr + r"=\{([\d,]*)\}", line)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def parse_hlo(text: str) -> dict:
  """Per computation: its dots and the computations it calls.

  Returns:
    `{name: {"dots": [(flops, dtype, precision)], "calls": [(callee,
    multiplier | "branch")], "consts": {name: value}, "compares": [...]}}`
    plus `"__entry__"`: the entry computation's name.
  """
  comps: dict = {}
  cur = None
  types: dict = {}
  for line in text.splitlines():
    if " = " not in line and line.rstrip().endswith("{"):
      h = _HEADER.match(line)
      if h:
        cur = h.group(1)
        comps[cur] = {"dots": [], "calls": [], "consts": {}, "compares": []}
        if line.lstrip().startswith("ENTRY"):
          comps["__entry__"] = cur
      continue
    if cur is None:
      continue
    c = comps[cur]
    m = _INSTR.match(line)
    if m:
      name, dtype, dims = m.groups()
      shape = [int(d) for d in dims.split(",") if d]
      types[name] = (dtype, shape)
      k = re.search(r"constant\((-?\d+)\)", line)
      if k and not shape:
        c["consts"][name] = int(k.group(1))
      d = _DOT.search(line)
      if d and d.group(1) in types:
        lhs_dtype, lhs_shape = types[d.group(1)]
        contract = math.prod(
          lhs_shape[i] for i in _dims("lhs_contracting_dims", line)
        )
        prec = re.search(r"operand_precision=\{(\w+)", line)
        c["dots"].append(
          (
            2.0 * math.prod(shape) * contract,
            lhs_dtype,
            prec.group(1).lower() if prec else "default",
          )
        )
    cmp = re.search(
      r"compare\(%?([\w.\-]+),\s*%?([\w.\-]+)\).*direction=(\w+)", line
    )
    if cmp:
      c["compares"].append(cmp.groups())
    w = re.search(r"condition=%?([\w.\-]+),\s*body=%?([\w.\-]+)", line)
    if w:
      c["calls"].append((w.group(2), ("while", w.group(1))))
      continue
    b = re.search(r"branch_computations=\{([^}]*)\}", line)
    if b:
      names = [n.strip().lstrip("%") for n in b.group(1).split(",")]
      c["calls"].append((tuple(names), "branch"))
      continue
    tf = re.search(
      r"true_computation=%?([\w.\-]+),\s*false_computation=%?"
      r"([\w.\-]+)",
      line,
    )
    if tf:
      c["calls"].append((tf.groups(), "branch"))
      continue
    for callee in re.findall(r"(?:to_apply|calls)=%?([\w.\-]+)", line):
      c["calls"].append((callee, 1))
  return comps


def _trip_count(comps: dict, cond: str) -> int:
  """`n` of a `compare(i, n), direction=LT` loop condition (counter from 0)."""
  c = comps.get(cond, {"compares": [], "consts": {}})
  for a, b, direction in c["compares"]:
    if direction == "LT" and b in c["consts"]:
      return max(0, c["consts"][b])
    if direction == "GT" and a in c["consts"]:
      return max(0, c["consts"][a])
  raise ValueError(f"cannot read the trip count of loop condition {cond}.")


def dots(comps: dict, name: str | None = None, mult: float = 1.0) -> list:
  """Every dot reachable from `name`, as (flops * multiplicity, dtype, prec)."""
  name = name or comps["__entry__"]
  out = [(f * mult, dt, pr) for f, dt, pr in comps[name]["dots"]]
  for callee, how in comps[name]["calls"]:
    if how == "branch":
      branches = [dots(comps, b, mult) for b in callee]
      out += max(branches, key=lambda ds: sum(d[0] for d in ds))
    elif isinstance(how, tuple):
      out += dots(comps, callee, mult * _trip_count(comps, how[1]))
    elif callee in comps:
      out += dots(comps, callee, mult)
  return out


def estimate(ds: list) -> dict:
  """FLOPs, bf16 share and compute-bound seconds on H100 and TPU v5p."""
  total = sum(f for f, _, _ in ds)
  bf16 = sum(f for f, dt, _ in ds if dt == "bf16")
  h100 = tpu = 0.0
  for f, dt, pr in ds:
    if dt == "bf16":
      h100 += f / H100["bf16"]
      tpu += f / TPU_V5P
    else:
      h100 += f / (H100["fp32"] if pr == "highest" else H100["tf32"])
      tpu += f * TPU_PASSES.get(pr, 1) / TPU_V5P
  return {
    "gflop": total / 1e9,
    "bf16_share": bf16 / total if total else 0.0,
    "h100_s": h100,
    "tpu_v5p_s": tpu,
    "dots": len(ds),
  }


def hlo_text(lowered) -> str:
  """The HLO text of a `jax.jit(...).lower(...)` (public API; the older
  `compiler_ir("hlo")` where `as_text` has no HLO dialect)."""
  try:
    return lowered.as_text(dialect="hlo")
  except (TypeError, ValueError, NotImplementedError):
    return lowered.compiler_ir("hlo").as_hlo_text()


def step_cost(fn, shapes: dict) -> dict:
  """Summed `estimate` of `fn` over the batches of `shapes`."""
  acc = {
    "gflop": 0.0,
    "bf16_gflop": 0.0,
    "h100_s": 0.0,
    "tpu_v5p_s": 0.0,
    "dots": 0,
  }
  for (m, n), count in shapes.items():
    x = jax.ShapeDtypeStruct(
      (count, m, n) if count > 1 else (m, n), jnp.float32
    )
    text = hlo_text(jax.jit(fn).lower(x))
    e = estimate(dots(parse_hlo(text)))
    acc["gflop"] += e["gflop"]
    acc["bf16_gflop"] += e["gflop"] * e["bf16_share"]
    acc["h100_s"] += e["h100_s"]
    acc["tpu_v5p_s"] += e["tpu_v5p_s"]
    acc["dots"] += e["dots"]
  acc["bf16_share"] = acc.pop("bf16_gflop") / acc["gflop"]
  return acc


def cpu_seconds(fn, shapes: dict, repeats: int) -> float:
  rng = np.random.default_rng(0)
  total = 0.0
  for (m, n), count in shapes.items():
    x = jnp.asarray(
      rng.standard_normal((count, m, n) if count > 1 else (m, n)), jnp.float32
    )
    total += _common.time_fn(jax.jit(fn), x, repeats=repeats)
  return total


def run(sets: dict, cpu_sets: set, power: float, repeats: int) -> list[dict]:
  rows = []
  ms = methods(power)
  base_name = next(iter(ms))
  for set_name, shapes in sets.items():
    base = step_cost(ms[base_name][0], shapes)
    base_cpu = (
      cpu_seconds(ms[base_name][0], shapes, repeats)
      if set_name in cpu_sets
      else None
    )
    for name, (fn, p) in ms.items():
      c = base if name == base_name else step_cost(fn, shapes)
      row = {
        "set": set_name,
        "method": name,
        "power": p,
        **c,
        "h100_ratio": c["h100_s"] / base["h100_s"],
        "tpu_v5p_ratio": c["tpu_v5p_s"] / base["tpu_v5p_s"],
        "flop_ratio": c["gflop"] / base["gflop"],
        "cpu_ratio": None,
        "cpu_s": None,
      }
      if base_cpu is not None:
        t = base_cpu if name == base_name else cpu_seconds(fn, shapes, repeats)
        row.update(cpu_s=t, cpu_ratio=t / base_cpu)
      rows.append(row)
      print(
        f"{set_name:10s} {name:28s} {c['gflop']:9.1f} GFLOP  bf16 "
        f"{c['bf16_share']:4.0%}  H100 x{row['h100_ratio']:.2f}  v5p "
        f"x{row['tpu_v5p_ratio']:.2f}"
        + (f"  CPU x{row['cpu_ratio']:.2f}" if row["cpu_ratio"] else ""),
        flush=True,
      )
  return rows


def table(rows: list[dict], power: float) -> str:
  lines = [
    f"p = {power} (methods marked p=0 and Newton-Schulz: p = 0). Estimated "
    "compute-bound time from published peak rates (H100 SXM bf16 989 / TF32 "
    "495 / fp32 67 TFLOP/s; TPU v5p 459 bf16 TFLOP/s, f32 dots 1/3/6 "
    "passes at DEFAULT/HIGH/HIGHEST), as ratios to optax.contrib.muon's "
    "Newton-Schulz on fp32 inputs at default precision; estimates, not "
    "measurements. Measured: wall-clock ratio on this machine's "
    f"{jax.default_backend()} backend.",
    "",
    "| shapes | method | GFLOP | bf16 share | est. H100 (us) | H100 ratio |"
    " est. v5p (us) | v5p ratio | measured ratio |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    cpu = "" if r["cpu_ratio"] is None else f"{r['cpu_ratio']:.2f}"
    lines.append(
      f"| {r['set']} | {r['method']} | {r['gflop']:.1f} | "
      f"{r['bf16_share']:.0%} | {1e6 * r['h100_s']:.0f} | "
      f"{r['h100_ratio']:.2f} | {1e6 * r['tpu_v5p_s']:.0f} | "
      f"{r['tpu_v5p_ratio']:.2f} | {cpu} |"
    )
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--quick", action="store_true", help="tiny shapes (smoke test)"
  )
  p.add_argument("--power", type=float, default=0.125)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument(
    "--cpu-shapes",
    nargs="*",
    default=None,
    help="shape sets also timed on this CPU (default: 1024^2; "
    "none with --quick)",
  )
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  sets = QUICK_SETS if args.quick else SHAPE_SETS
  if args.cpu_shapes is None:
    args.cpu_shapes = [] if args.quick else ["1024^2"]
  cpu_sets = set(args.cpu_shapes)
  rows = run(sets, cpu_sets, args.power, 1 if args.quick else args.repeats)
  md = table(rows, args.power)
  payload = {
    "power": args.power,
    "rows": rows,
    "machine": _common.machine(),
    "rates": {"h100": H100, "tpu_v5p": TPU_V5P, "tpu_passes": TPU_PASSES},
  }
  _common.write("accelerator_cost", payload, md, args.out)
  return payload


if __name__ == "__main__":
  main()
