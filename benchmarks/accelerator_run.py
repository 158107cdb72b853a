"""Sections of `benchmarks/run_accelerator.sh`, one per process.

  python benchmarks/accelerator_run.py SECTION OUT_JSON

SECTION: `versions`, `smoke`, `spectral`, `step`, `race`.
`HTMUON_ACCEL_SMOKE=1`: tiny shapes, few repeats, a 2-second race (the CPU
check of the same code paths). Measured: wall time (median after warm-up,
synchronized), compile time and the process's peak device memory so far
(`memory_stats()`, None where the backend has none; it cannot be reset, so
per call it is an upper bound). Estimated: XLA's memory estimate of each
compiled call (`memory_analysis()`), and: compute-bound time from the HLO
(`accelerator_cost.step_cost`).

The JSON is rewritten (write, then rename) after every row, with
`"complete": false` until the section ends: a section killed by its
timeout, or one that raises, keeps the rows it finished (and an `"error"`).

Race: a LLaMA-style decoder (`examples/train_lm.py`, character level) on
the embedded text (Python's help topics, `pydoc_data`), trained by each
optimizer for the same wall-clock budget (`HTMUON_RACE_S` seconds of
training steps, default 45; compile and evaluation not counted), the
learning rate warmed up and cosine-decayed over that budget's fraction
elapsed; validation loss every `eval_every_s` seconds and at the end.
"""

from __future__ import annotations

import dataclasses
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

try:  # The package and its benchmarks: `versions` reports a failure here.
  import accelerator_cost
  import optimizer_step

  import htmuon_jax

  IMPORT_ERROR = None
except Exception as e:  # noqa: BLE001
  IMPORT_ERROR = f"{type(e).__name__}: {e}"

SMOKE = os.environ.get("HTMUON_ACCEL_SMOKE") == "1"
EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
POWER = 0.125
METHODS = ("polynomial", "newton_schulz", "express", "svd", "eigh")
# The matrix-product methods: timed at both precisions.
PRODUCT_METHODS = ("polynomial", "newton_schulz", "express")
PRECISIONS = ("accurate", "fast")


class Section:
  """The JSON of one section, rewritten after every row (write, rename), so
  that a kill keeps what was done."""

  def __init__(self, name: str, path: str):
    self.path = pathlib.Path(path)
    self.payload: dict = {
      "section": name,
      "smoke": SMOKE,
      "complete": False,
      "machine": _common.machine(),
      "rows": [],
    }
    self.write()

  def write(self) -> None:
    tmp = self.path.with_name(f".{self.path.name}.tmp")
    tmp.write_text(json.dumps(self.payload, indent=1))
    os.replace(tmp, self.path)

  def row(self, row: dict) -> None:
    self.payload["rows"].append(row)
    print(self.payload["section"], row, flush=True)
    self.write()

  def update(self, **fields) -> None:
    self.payload.update(fields)
    self.write()


def versions(sec: Section) -> None:
  out = {}
  for name in ("jax", "jaxlib", "optax", "flax"):
    try:
      out[name] = __import__(name).__version__
    except Exception as e:  # noqa: BLE001
      out[name] = f"unavailable: {e}"
  out["python"] = sys.version.split()[0]
  out["htmuon_jax"] = IMPORT_ERROR or "imported"
  out["device"] = str(jax.devices()[0])
  out["backend"] = jax.default_backend()
  try:
    out["memory_stats"] = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001
    out["memory_stats"] = None
  if out["backend"] == "cpu" and not SMOKE:
    out["warning"] = "jax runs on the CPU: no accelerator was found"
    print(f"WARNING: {out['warning']}", flush=True)
  print("versions", out, flush=True)
  sec.update(**out)


def xla_bytes(compiled):
  """XLA's memory estimate of a compiled call (arguments + outputs +
  temporaries - aliased), or None."""
  try:
    m = compiled.memory_analysis()
    return (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
    )
  except Exception:  # noqa: BLE001
    return None


def peak_bytes():
  """Peak device memory in use so far in this process (`memory_stats()`
  has no reset, so it only grows within a section), or None (e.g. CPU)."""
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
    "peak_bytes_so_far": peak_bytes(),
    "xla_bytes": xla_bytes(compiled),
  }


def smoke(sec: Section) -> None:
  params = {"w": jnp.ones((16, 24), jnp.float32), "b": jnp.zeros((24,))}
  grads = jax.tree.map(lambda p: p * 0.1 + 0.01, params)
  for method in METHODS:
    p = 0.0 if method == "newton_schulz" else POWER
    opt = htmuon_jax.htmuon(0.01, p, method=method)
    upd, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    w = upd["w"]
    sec.row(
      {
        "method": method,
        "backend": jax.default_backend(),
        "dtype": str(w.dtype),
        "finite": bool(jnp.all(jnp.isfinite(w))),
      }
    )


def spectral_fns() -> dict:
  fns = {"optax muon NS5 (baseline)": accelerator_cost._optax_ns}
  for m in METHODS:
    for prec in PRECISIONS if m in PRODUCT_METHODS else ("accurate",):
      p = 0.0 if m == "newton_schulz" else POWER
      fns[f"{m} {prec}"] = lambda x, m=m, prec=prec, p=p: (
        htmuon_jax.spectral_power(
          x,
          p,
          method=(
            dataclasses.replace(
              htmuon_jax.methods.get_method(m), precision=prec
            )
            if hasattr(htmuon_jax.methods.get_method(m), "precision")
            else m
          ),
        )
      )
  return fns


def spectral(sec: Section) -> None:
  sets = (
    {"tiny": {(32, 32): 2, (48, 32): 1}}
    if SMOKE
    else {
      k: accelerator_cost.SHAPE_SETS[k]
      for k in ("1024^2", "4096^2", "LLaMA-60M", "LLaMA-1B")
    }
  )
  repeats = 1 if SMOKE else 5
  fns = spectral_fns()
  solvers = [k for k in fns if k.startswith(("svd", "eigh"))]
  # Matrix-product methods on every set first, then the solvers (slowest;
  # a budget cut keeps the rest).
  order = [
    (set_name, name)
    for group in ([k for k in fns if k not in solvers], solvers)
    for set_name in sets
    for name in group
  ]
  for set_name, name in order:
    shapes, fn = sets[set_name], fns[name]
    try:  # The estimate reads the HLO text: keep the measurement if not.
      est = (
        {"h100_s": None, "gflop": None}  # Solver kernels: not modelled.
        if name in solvers
        else accelerator_cost.step_cost(fn, shapes)
      )
    except Exception as e:  # noqa: BLE001
      est = {
        "h100_s": None,
        "gflop": None,
        "error": f"{type(e).__name__}: {e}",
      }
    meas = {
      "time_s": 0.0,
      "compile_s": 0.0,
      "peak_bytes_so_far": None,
      "xla_bytes": None,
    }
    for i, ((m, n), count) in enumerate(shapes.items()):
      # Drawn on the device: host draws of the LLaMA-1B set take seconds.
      x = jax.random.normal(
        jax.random.key(i), (count, m, n) if count > 1 else (m, n), jnp.float32
      )
      r = measure(fn, x, repeats=repeats)
      meas["time_s"] += r["time_s"]
      meas["compile_s"] += r["compile_s"]
      meas["peak_bytes_so_far"] = r["peak_bytes_so_far"]
      if r["xla_bytes"] is not None:  # The largest batch of the set.
        meas["xla_bytes"] = max(meas["xla_bytes"] or 0, r["xla_bytes"])
    sec.row(
      {
        "set": set_name,
        "method": name,
        **meas,
        "est_h100_s": est["h100_s"],
        "est_gflop": est["gflop"],
        **({"est_error": est["error"]} if "error" in est else {}),
      }
    )


def normal_like(key, tree, scale: float):
  """Gaussian leaves like `tree`'s (full rank, as real gradients)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
    [
      scale * jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(keys, leaves)
    ]
  )


def step(sec: Section) -> None:
  models = (
    {"tiny": optimizer_step.MODELS["tiny"]}
    if SMOKE
    else {
      "llama-60m": optimizer_step.MODELS["llama-60m"],
      "llama-1b": dict(hidden=2048, intermediate=5461, layers=24, vocab=32000),
    }
  )
  repeats = 1 if SMOKE else 3
  opts = {  # svd last: the slowest.
    "optax.contrib.muon": lambda: optax.contrib.muon(0.01),
    "htmuon auto": lambda: htmuon_jax.htmuon(0.03, POWER),
    "htmuon svd": lambda: htmuon_jax.htmuon(0.03, POWER, method="svd"),
  }
  # The unstacked LLaMA-1B update compiles slowest: last, so that a budget
  # cut keeps the others.
  names = list(models)
  order = [(names[0], False), (names[0], True)] + [
    (n, s) for n in names[1:] for s in (True, False)
  ]
  built: dict = {}
  for name, scanned in order:
    cfg = models[name]
    if name not in built:
      built[name] = optimizer_step.model_params(cfg, cfg["layers"], True)
    params = built[name]
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
    g = normal_like(jax.random.key(1), p, 0.01)
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
      sec.row(
        {
          "model": name,
          "scanned": scanned,
          "optimizer": opt_name,
          **r,
          "params": int(sum(x.size for x in jax.tree.leaves(p))),
        }
      )


# The race: model, data and budget (`HTMUON_RACE_S`: seconds of training
# steps per optimizer).
RACE_MODEL = (
  dict(dim=32, num_layers=1, num_heads=2)
  if SMOKE
  else dict(dim=512, num_layers=10, num_heads=8)  # ~32M parameters.
)
RACE_DATA = (
  dict(seq_len=32, batch_size=4, eval_batches=2, max_chars=50_000)
  if SMOKE
  else dict(seq_len=256, batch_size=32, eval_batches=8, max_chars=None)
)
RACE_S = float(os.environ.get("HTMUON_RACE_S", 2 if SMOKE else 45))
EVAL_EVERY_S = RACE_S / 4
ADAM_LR, WEIGHT_DECAY = 1e-3, 0.1
# name: (examples' optimizer name, peak learning rate, power, method).
RACERS = {
  "muon (optax.contrib.muon)": ("optax_muon", 1e-2, None, None),
  "htmuon auto": ("htmuon", 3e-2, POWER, None),
  "htmuon svd": ("htmuon", 3e-2, POWER, "svd"),
}


def _examples():
  """`train_lm`, `example_data`, `example_utils` from examples/ (orbax,
  which only their checkpoints need, may be missing)."""
  sys.path.insert(0, str(EXAMPLES))
  try:
    import orbax.checkpoint  # noqa: F401
  except Exception as e:  # noqa: BLE001
    import types

    print(f"race: orbax unavailable ({e}); no checkpoints needed", flush=True)
    sys.modules["example_checkpoints"] = types.SimpleNamespace(
      Checkpointer=None
    )
  import example_data
  import example_utils
  import train_lm

  return train_lm, example_data, example_utils


def lr_scale(fraction: float) -> float:
  """Warmup over the first 5% of the budget, cosine down to 10% of peak."""
  f = min(max(fraction, 0.0), 1.0)
  return min(1.0, f / 0.05 + 1e-3) * (0.1 + 0.45 * (1 + np.cos(np.pi * f)))


def race(sec: Section) -> None:
  from flax import nnx

  train_lm, example_data, example_utils = _examples()
  text = example_data.load_text("pydoc", max_chars=RACE_DATA["max_chars"])
  tok = example_data.Tokenizer.fit(text, "char")
  train_tokens, val_tokens = example_data.split_tokens(tok.encode(text))
  seq, bs = RACE_DATA["seq_len"], RACE_DATA["batch_size"]
  eval_batches = [
    jnp.asarray(b)
    for b in example_data.lm_eval_batches(
      val_tokens, RACE_DATA["eval_batches"], bs, seq, 0
    )
  ]
  cfg = train_lm.LMConfig(vocab_size=tok.vocab_size, **RACE_MODEL)
  dims = lambda p: train_lm.lm_dimension_numbers(p, split="authors")
  sec.update(
    model={**RACE_MODEL, "vocab_size": tok.vocab_size},
    data={**RACE_DATA, "train_tokens": len(train_tokens), "text": "pydoc"},
    budget_s=RACE_S,
  )
  for racer, (name, lr, power, method) in RACERS.items():
    model = train_lm.LM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    tx = example_utils.OPTIMIZERS[name].build(
      lr, ADAM_LR, WEIGHT_DECAY, dims, power, method
    )
    opt_state = tx.init(params)

    def loss_of(p, batch, graphdef=graphdef, rest=rest):
      return train_lm.lm_loss(nnx.merge(graphdef, p, rest), batch)[0]

    def train_step(p, s, batch, scale, tx=tx, loss_of=loss_of):
      loss, grads = jax.value_and_grad(loss_of)(p, batch)
      updates, s = tx.update(grads, s, p)
      updates = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
      return optax.apply_updates(p, updates), s, loss

    batch_of = lambda i: jnp.asarray(
      example_data.lm_batch(train_tokens, i, bs, seq, 0)
    )
    scale0 = jnp.float32(0.0)
    t = time.perf_counter()
    step_fn = (
      jax.jit(train_step, donate_argnums=(0, 1))
      .lower(params, opt_state, batch_of(0), scale0)
      .compile()
    )
    eval_fn = jax.jit(loss_of).lower(params, eval_batches[0]).compile()
    compile_s = time.perf_counter() - t

    def evaluate(p, eval_fn=eval_fn):
      return float(np.mean([float(eval_fn(p, b)) for b in eval_batches]))

    train_s, steps, chunk, next_eval = 0.0, 0, 1, EVAL_EVERY_S
    loss, best = jnp.nan, np.inf
    while train_s < RACE_S:
      scale = jnp.float32(lr_scale(train_s / RACE_S))
      t = time.perf_counter()
      for _ in range(chunk):
        params, opt_state, loss = step_fn(
          params, opt_state, batch_of(steps), scale
        )
        steps += 1
      loss = float(loss)  # Synchronizes.
      dt = time.perf_counter() - t
      train_s += dt
      # About 0.5 s between clock checks (and learning-rate updates).
      chunk = int(min(50, max(1, chunk * 0.5 / max(dt, 1e-6))))
      if train_s >= next_eval or train_s >= RACE_S:
        next_eval += EVAL_EVERY_S
        t = time.perf_counter()
        val = evaluate(params)
        best = min(best, val)
        sec.row(
          {
            "optimizer": racer,
            "final": train_s >= RACE_S,
            "train_s": train_s,
            "steps": steps,
            "tokens": steps * bs * seq,
            "tokens_per_s": steps * bs * seq / train_s,
            "train_loss": loss,
            "val_loss": val,
            "best_val_loss": best,
            "eval_s": time.perf_counter() - t,
            "compile_s": compile_s,
            "params": n_params,
            "peak_bytes_so_far": peak_bytes(),
          }
        )


SECTIONS = {
  "versions": versions,
  "smoke": smoke,
  "spectral": spectral,
  "step": step,
  "race": race,
}


def main() -> None:
  name, out = sys.argv[1], sys.argv[2]
  sec = Section(name, out)
  try:
    if IMPORT_ERROR and name != "versions":
      raise ImportError(f"htmuon_jax or a benchmark module: {IMPORT_ERROR}")
    SECTIONS[name](sec)
  except BaseException as e:
    import traceback

    sec.update(
      error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()
    )
    raise
  sec.update(complete=True)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
