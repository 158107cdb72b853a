"""Sections of `benchmarks/run_accelerator.sh`, one per process.

  python benchmarks/accelerator_run.py SECTION OUT_JSON

SECTION: `versions`, `smoke`, `spectral`, `step`. `HTMUON_ACCEL_SMOKE=1`:
tiny shapes and few repeats (the CPU check of the same code paths).
Measured: wall time (median after warm-up, synchronized), compile time and
peak device memory (`memory_stats()`, None where the backend has none).
Estimated: compute-bound time from the HLO (`accelerator_cost.step_cost`).
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402
import accelerator_cost  # noqa: E402
import optimizer_step  # noqa: E402

import htmuon_jax  # noqa: E402

SMOKE = os.environ.get("HTMUON_ACCEL_SMOKE") == "1"
POWER = 0.125
METHODS = ("polynomial", "newton_schulz", "svd", "eigh")
PRECISIONS = ("accurate", "fast")


def versions() -> dict:
  out = {"machine": _common.machine()}
  for name in ("jax", "jaxlib", "optax", "flax"):
    try:
      out[name] = __import__(name).__version__
    except Exception as e:  # noqa: BLE001
      out[name] = f"unavailable: {e}"
  out["device"] = str(jax.devices()[0])
  return out


def peak_bytes():
  """Peak device memory in use so far, or None (e.g. CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    return None
  if not stats:
    return None
  return stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))


def measure(fn, *args, repeats: int) -> dict:
  t = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  return {
    "time_s": statistics.median(times),
    "compile_s": compile_s,
    "peak_bytes": peak_bytes(),
  }


def smoke() -> dict:
  rows = []
  params = {"w": jnp.ones((16, 24), jnp.float32), "b": jnp.zeros((24,))}
  grads = jax.tree.map(lambda p: p * 0.1 + 0.01, params)
  for method in METHODS:
    p = 0.0 if method == "newton_schulz" else POWER
    opt = htmuon_jax.htmuon(0.01, p, method=method)
    upd, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    w = upd["w"]
    rows.append(
      {
        "method": method,
        "backend": jax.default_backend(),
        "dtype": str(w.dtype),
        "finite": bool(jnp.all(jnp.isfinite(w))),
      }
    )
    print("smoke", rows[-1], flush=True)
  return {"rows": rows}


def spectral_fns() -> dict:
  fns = {"optax muon NS5 (baseline)": accelerator_cost._optax_ns}
  for m in METHODS:
    for prec in (
      PRECISIONS if m in ("polynomial", "newton_schulz") else ("accurate",)
    ):
      p = 0.0 if m == "newton_schulz" else POWER
      fns[f"{m} {prec}"] = lambda x, m=m, prec=prec, p=p: (
        htmuon_jax.spectral_power(
          x, p, method=htmuon_jax.from_keywords(m, precision=prec)
        )
      )
  return fns


def spectral() -> dict:
  sets = (
    {"tiny": {(32, 32): 2, (48, 32): 1}}
    if SMOKE
    else {
      k: accelerator_cost.SHAPE_SETS[k]
      for k in ("1024^2", "4096^2", "LLaMA-60M", "LLaMA-1B")
    }
  )
  repeats = 1 if SMOKE else 5
  rng = np.random.default_rng(0)
  rows = []
  for set_name, shapes in sets.items():
    for name, fn in spectral_fns().items():
      est = accelerator_cost.step_cost(fn, shapes)
      meas = {"time_s": 0.0, "compile_s": 0.0, "peak_bytes": None}
      for (m, n), count in shapes.items():
        x = jnp.asarray(
          rng.standard_normal((count, m, n) if count > 1 else (m, n)),
          jnp.float32,
        )
        r = measure(fn, x, repeats=repeats)
        meas["time_s"] += r["time_s"]
        meas["compile_s"] += r["compile_s"]
        meas["peak_bytes"] = r["peak_bytes"]
      rows.append(
        {
          "set": set_name,
          "method": name,
          **meas,
          "est_h100_s": est["h100_s"],
          "est_gflop": est["gflop"],
        }
      )
      print("spectral", rows[-1], flush=True)
  return {"rows": rows, "smoke": SMOKE}


def step() -> dict:
  models = (
    {"tiny": optimizer_step.MODELS["tiny"]}
    if SMOKE
    else {
      "llama-60m": optimizer_step.MODELS["llama-60m"],
      "llama-1b": dict(hidden=2048, intermediate=5461, layers=24, vocab=32000),
    }
  )
  repeats = 1 if SMOKE else 3
  opts = {
    "htmuon auto": lambda: htmuon_jax.htmuon(0.03, POWER),
    "htmuon svd": lambda: htmuon_jax.htmuon(0.03, POWER, method="svd"),
    "optax.contrib.muon": lambda: optax.contrib.muon(0.01),
  }
  rows = []
  for name, cfg in models.items():
    params = optimizer_step.model_params(cfg, cfg["layers"], True)
    for scanned in (False, True):
      p = params
      if scanned:  # Blocks stacked along a leading layer axis.
        blocks = [params[k] for k in params if k.startswith("layer")]
        p = {
          "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks),
          "embed": params["embed"],
          "lm_head": params["lm_head"],
        }
      dims = jax.tree.map(
        lambda x, s=scanned, L=cfg["layers"]: (
          optax.contrib.MuonDimensionNumbers(
            reduction_axis=x.ndim - 2, output_axis=x.ndim - 1
          )
          if x.ndim >= 2 and not (s and x.ndim == 2 and x.shape[0] == L)
          else None
        ),
        p,
      )
      g = jax.tree.map(lambda x: jnp.full_like(x, 0.01) + 0.001 * x, p)
      for opt_name, make in opts.items():
        opt = make()
        if scanned:
          opt = (
            htmuon_jax.htmuon(
              0.03,
              POWER,
              method="svd" if "svd" in opt_name else "auto",
              muon_weight_dimension_numbers=dims,
            )
            if opt_name.startswith("htmuon")
            else optax.contrib.muon(0.01, muon_weight_dimension_numbers=dims)
          )
        state = opt.init(p)
        r = measure(opt.update, g, state, p, repeats=repeats)
        rows.append(
          {
            "model": name,
            "scanned": scanned,
            "optimizer": opt_name,
            **r,
            "params": int(sum(x.size for x in jax.tree.leaves(p))),
          }
        )
        print("step", rows[-1], flush=True)
  return {"rows": rows, "smoke": SMOKE}


def main() -> None:
  section, out = sys.argv[1], sys.argv[2]
  fn = {
    "versions": versions,
    "smoke": smoke,
    "spectral": spectral,
    "step": step,
  }[section]
  payload = {"section": section, "smoke": SMOKE, **fn()}
  payload.setdefault("machine", _common.machine())
  pathlib.Path(out).write_text(json.dumps(payload, indent=1))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
