"""Does the spectral method change training? Validation loss per method.

Trains the example LM (`examples/train_lm.py`: its model, data and loss; the
training loop of `examples/example_utils.py`) with HTMuon under each spectral
method and precision, and with Muon and AdamW as references. Every
configuration sees the same initialization and the same batches for a given
seed; the table gives the final validation loss (mean and spread over seeds)
and the time per step on this machine.

Configurations (HTMuon at p = 0.125 unless noted, the paper's learning
rates and schedule, `examples/example_utils.make_optimizer`'s settings):
`svd`, `polynomial` (precision accurate / fast), `stream`, `interval=5`
(HT step every 5th update, Newton-Schulz otherwise; the authors' 1B
setting), the authors' accelerated NS variant (`benchmarks/authors_ns.py`,
registered here as a method), Muon (Newton-Schulz, `htmuon_jax.muon`) and
AdamW.

Usage:
  python benchmarks/method_quality.py [--quick] [--steps 600] [--seeds 3]

Prints a markdown table and writes `benchmarks/results/method_quality.json`
(and `.md`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
import _common  # noqa: E402
import authors_ns  # noqa: E402
import example_data  # noqa: E402
import example_utils  # noqa: E402
import train_lm  # noqa: E402

import htmuon_jax  # noqa: E402
from htmuon_jax import methods  # noqa: E402
from htmuon_jax._numerics import compute_dtype  # noqa: E402

POWER = 0.125
# name -> (optimizer, htmuon keywords).
CONFIGS = {
  "htmuon svd": ("htmuon", dict(method="svd")),
  "htmuon polynomial accurate": (
    "htmuon",
    dict(method=htmuon_jax.methods.Polynomial(precision="accurate")),
  ),
  "htmuon polynomial fast": (
    "htmuon",
    dict(method=htmuon_jax.methods.Polynomial(precision="fast")),
  ),
  "htmuon stream": ("htmuon", dict(method="stream")),
  "htmuon interval=5 (svd)": ("htmuon", dict(method="svd", interval=5)),
  "htmuon authors' NS": ("htmuon", dict(method="authors_ns")),
  "muon (newton_schulz)": ("muon", {}),
  "adamw": ("adamw", {}),
}


@dataclasses.dataclass(frozen=True)
class AuthorsNS(methods.SpectralMethod):
  """The authors' Newton-Schulz spectral power, as a method."""

  name = "authors_ns"

  def apply(self, x, state, power, eps, values):
    del eps, values
    x = x.astype(compute_dtype(x.dtype))
    return authors_ns.authors_ns(x, float(power)), state


def _register_authors_ns() -> None:
  if "authors_ns" not in methods.method_names():
    methods.register_method(AuthorsNS())


def optimizer(
  name: str,
  extra: dict,
  lr: float,
  steps: int,
  dims,
  weight_decay: float,
  adam_lr: float,
):
  """`example_utils.make_optimizer`'s optimizer, plus htmuon keywords."""
  if name != "htmuon":
    return example_utils.make_optimizer(
      name,
      learning_rate=lr,
      total_steps=steps,
      weight_decay=weight_decay,
      weight_dimension_numbers=dims,
      adam_lr=adam_lr,
    )
  return htmuon_jax.htmuon(
    learning_rate=example_utils.warmup_cosine(lr, steps),
    power=POWER,
    weight_decay=weight_decay,
    adam_learning_rate=example_utils.warmup_cosine(adam_lr, steps),
    adam_b2=0.95,
    eps=1e-10,
    muon_weight_dimension_numbers=dims,
    **extra,
  )


def run_one(config: str, seed: int, args) -> dict:
  name, extra = CONFIGS[config]
  lm_args = train_lm.parser().parse_args(
    [
      "--optimizer",
      name,
      "--dim",
      str(args.dim),
      "--layers",
      str(args.layers),
      "--heads",
      str(args.heads),
      "--seq-len",
      str(args.seq_len),
      "--batch-size",
      str(args.batch_size),
      "--steps",
      str(args.steps),
      "--seed",
      str(seed),
      "--eval-batches",
      str(args.eval_batches),
      "--no-progress",
    ]
  )
  _, model, _, data, dims, lr = train_lm.build(lm_args)
  tx = optimizer(
    name, extra, lr, args.steps, dims, lm_args.weight_decay, lm_args.adam_lr
  )
  batch_fn = lambda step: example_data.lm_batch(
    data["train"], step, args.batch_size, args.seq_len, seed
  )
  eval_batches = example_data.lm_eval_batches(
    data["val"], args.eval_batches, args.batch_size, args.seq_len, seed
  )
  t = time.perf_counter()
  result = example_utils.train(
    model,
    tx,
    loss_fn=train_lm.lm_loss,
    batch_fn=batch_fn,
    eval_batches=eval_batches,
    steps=args.steps,
    eval_every=0,
    log_every=max(1, args.steps // 10),
    progress=False,
    desc=config,
    items_per_batch=args.batch_size * args.seq_len,
    items_name="tokens",
  )
  return {
    "config": config,
    "seed": seed,
    "lr": lr,
    "val_loss": result["final_val_loss"],
    "train_loss": result["final_train_loss"],
    "time_per_step_ms": 1e3 * result["time_per_step_s"],
    "wall_s": time.perf_counter() - t,
  }


BASELINE = "htmuon svd"


def summarize(rows: list[dict], configs: list[str]) -> list[dict]:
  """Per configuration: loss statistics, and the paired difference to svd.

  Seeds differ in initialization, batches and validation batches, so the
  spread over seeds is mostly that of the data; the difference to
  `BASELINE` on the same seed isolates the method.
  """
  base = {r["seed"]: r["val_loss"] for r in rows if r["config"] == BASELINE}
  out = []
  for c in configs:
    rs = [r for r in rows if r["config"] == c]
    if not rs:
      continue
    losses = [r["val_loss"] for r in rs]
    deltas = [r["val_loss"] - base[r["seed"]] for r in rs if r["seed"] in base]
    out.append(
      {
        "delta_vs_svd_mean": statistics.fmean(deltas) if deltas else None,
        "delta_vs_svd_std": (
          statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        )
        if deltas
        else None,
        "config": c,
        "seeds": len(rs),
        "val_loss_mean": statistics.fmean(losses),
        "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "val_loss_min": min(losses),
        "val_loss_max": max(losses),
        "time_per_step_ms": statistics.median(
          r["time_per_step_ms"] for r in rs
        ),
      }
    )
  return out


def table(summary: list[dict], args) -> str:
  lines = [
    f"LM dim {args.dim}, {args.layers} layers, seq {args.seq_len}, batch "
    f"{args.batch_size}, {args.steps} steps, seeds {args.seeds}; p = "
    f"{POWER}. Validation loss (nats/char): mean +- std over seeds "
    "[min, max]; time per step: median over seeds, this machine.",
    "",
    "| configuration | val loss | [min, max] | vs svd, same seed | ms / step |",
    "|---|---|---|---|---|",
  ]
  for s in summary:
    d = (
      "n/a"
      if s["delta_vs_svd_mean"] is None
      else f"{s['delta_vs_svd_mean']:+.4f} +- {s['delta_vs_svd_std']:.4f}"
    )
    lines.append(
      f"| {s['config']} | {s['val_loss_mean']:.4f} +- "
      f"{s['val_loss_std']:.4f} | [{s['val_loss_min']:.4f}, "
      f"{s['val_loss_max']:.4f}] | {d} | {s['time_per_step_ms']:.1f} |"
    )
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--quick",
    action="store_true",
    help="smoke test: tiny model, 3 steps, 1 seed, 3 configs",
  )
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--seq-len", type=int, default=32)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--eval-batches", type=int, default=16)
  p.add_argument(
    "--configs",
    nargs="*",
    default=None,
    help="subset of the configurations (default: all)",
  )
  p.add_argument(
    "--resummarize",
    default=None,
    metavar="JSON",
    help="rebuild the table of an earlier run's JSON; no training",
  )
  p.add_argument(
    "--out",
    default=None,
    help="JSON path (default benchmarks/results/method_quality.json)",
  )
  args = p.parse_args(argv)
  configs = args.configs or list(CONFIGS)
  if args.resummarize:
    old = json.loads(pathlib.Path(args.resummarize).read_text())
    vars(args).update(
      {k: v for k, v in old["args"].items() if k not in ("resummarize", "out")}
    )
    return _write(
      old["rows"],
      old.get("failures", []),
      args.configs or list(CONFIGS),
      args,
      old.get("machine"),
    )
  if args.quick:
    args.steps, args.seeds, args.dim, args.layers = 3, 1, 32, 1
    args.heads, args.seq_len, args.batch_size, args.eval_batches = 2, 16, 2, 1
    configs = args.configs or [
      "htmuon polynomial fast",
      "htmuon authors' NS",
      "adamw",
    ]
  _register_authors_ns()
  if not args.quick:
    # The seeds of one configuration compile the same programs: a
    # persistent cache (this run only) compiles each once.
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  rows, failures = [], []
  for seed in range(args.seeds):
    for c in configs:
      try:
        r = run_one(c, seed, args)
      except Exception as e:  # pylint: disable=broad-except
        # Record and go on: one failing configuration must not lose the
        # others' results.
        failures.append({"config": c, "seed": seed, "error": repr(e)})
        print(f"seed {seed} {c}: FAILED {e!r}", flush=True)
        continue
      rows.append(r)
      print(
        f"seed {seed} {c}: val {r['val_loss']:.4f}, "
        f"{r['time_per_step_ms']:.1f} ms/step, {r['wall_s']:.0f} s",
        flush=True,
      )
      if not np.isfinite(r["val_loss"]):
        print(f"  (non-finite loss for {c})", flush=True)
    # Results so far, so that an interrupted run keeps its finished seeds.
    payload = _write(rows, failures, configs, args)
  return payload


def _write(rows, failures, configs, args, machine=None) -> dict:
  summary = summarize(rows, configs)
  md = table(summary, args)
  if failures:
    md += "\n\nFailed runs: " + "; ".join(
      f"{f['config']} (seed {f['seed']}): {f['error']}" for f in failures
    )
  kept = {
    k: v for k, v in vars(args).items() if k not in ("resummarize", "out")
  }
  payload = {
    "args": kept,
    "power": POWER,
    "rows": rows,
    "failures": failures,
    "summary": summary,
    "machine": machine or _common.machine(),
  }
  _common.write("method_quality", payload, md, args.out)
  return payload


if __name__ == "__main__":
  main()
