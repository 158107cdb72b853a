"""Learning-rate sweep with seeds, the engine of `compare.py --sweep`.

For every optimizer:

1. a learning-rate grid around its paper value (`lr_grid`: by default
   x0.5, x1, x2, x4), one run per value with the selection seed (the first of
   `--sweep-seeds`); the value with the lowest final validation loss is chosen
   (a diverged run counts as +inf);
2. the chosen value again with each further seed.

Run `i` with seed `s` uses the same initialization and the same batches for
every optimizer (the training script derives both from `--seed`). Every
finished run is appended to `sweep.json` (and its table rewritten) at once,
so an interrupted sweep keeps what it did, and running the same command
again skips the runs already there.

Outputs under the output directory: `sweep.json` (config, every run with
its curves and alpha history, the summary), `sweep.md` (tables),
`lr_sweep.png`, `loss_curves.png` (at the chosen learning rates, band over
the seeds), `alpha_over_training.png`, and one metrics JSON per run under
`runs/`.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np

import compare_plots

DEFAULT_LR_FACTORS = (0.5, 1.0, 2.0, 4.0)
DEFAULT_SEEDS = (0, 1, 2)
SWEEP_JSON, SWEEP_MD = "sweep.json", "sweep.md"
RECORD_SUFFIX = ".record.json"  # One per finished run, under `runs/`.

# `(optimizer, lr, seed, metrics_json_path) -> a run record` (see `run_record`).
RunFn = Callable[[str, float, int, str], dict[str, Any]]


def lr_grid(
  base: float, factors: Sequence[float] = DEFAULT_LR_FACTORS
) -> list[float]:
  """The learning rates `base * f`, rounded to 3 significant digits.

  Raises:
    ValueError: a non-positive `base` or factor, or duplicate values.
  """
  if not base > 0 or not factors or any(not f > 0 for f in factors):
    raise ValueError(
      f"lr_factors: need a positive base and factors, got {base}, {factors}."
    )
  lrs = [float(f"{base * f:.3g}") for f in factors]
  if len(set(lrs)) != len(lrs):
    raise ValueError(f"lr_factors: duplicate learning rates {lrs}.")
  return lrs


def run_name(optimizer: str, lr: float, seed: int) -> str:
  return f"{optimizer}_lr{lr:g}_seed{seed}"


def _val_key(run: dict[str, Any]) -> float:
  v = run.get("final_val_loss", float("nan"))
  return v if run.get("status") == "ok" and math.isfinite(v) else math.inf


def choose_lr(
  runs: Sequence[dict[str, Any]], optimizer: str, seed: int
) -> Optional[float]:
  """The learning rate whose `seed` run has the lowest validation loss."""
  cands = [
    r
    for r in runs
    if r["optimizer"] == optimizer
    and r["seed"] == seed
    and r.get("status") == "ok"
  ]
  if not cands:
    return None
  best = min(cands, key=lambda r: (_val_key(r), r["lr"]))
  return best["lr"] if math.isfinite(_val_key(best)) else None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof 1; NaN for one value)."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    return float("nan"), float("nan")
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def summarize(
  runs: Sequence[dict[str, Any]],
  optimizers: Sequence[str],
  grids: dict[str, list[float]],
  seeds: Sequence[int],
) -> dict[str, Any]:
  """Per optimizer and lr: val loss mean/std over seeds; chosen lrs."""
  ok = [r for r in runs if r.get("status") == "ok"]
  per_lr, chosen = [], {}
  for name in optimizers:
    best = choose_lr(ok, name, seeds[0])
    chosen[name] = best
    for lr in sorted(grids[name]):
      rs = [r for r in ok if r["optimizer"] == name and r["lr"] == lr]
      if not rs:
        continue
      vals = [r["final_val_loss"] for r in rs]
      mean, std = mean_std(vals)
      per_lr.append(
        {
          "optimizer": name,
          "lr": lr,
          "chosen": lr == best,
          "seeds": [r["seed"] for r in rs],
          "val_loss": vals,
          "val_loss_mean": mean,
          "val_loss_std": std,
          "train_loss_mean": mean_std([r["final_train_loss"] for r in rs])[0],
          "time_per_step_s": float(
            np.median([r["time_per_step_s"] for r in rs])
          ),
          "alpha_median": mean_std([r["alpha_median"] for r in rs])[0],
          "alpha_ks": mean_std([r["alpha_ks"] for r in rs])[0],
        }
      )
  return {"per_lr": per_lr, "chosen_lr": chosen}


def _fmt(mean: float, std: float, n: int) -> str:
  if not math.isfinite(mean):
    return "diverged (nan)"
  return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def tables(
  summary: dict[str, Any], runs: Sequence[dict[str, Any]], unit: str
) -> str:
  """Markdown: chosen lr per optimizer, then every (optimizer, lr)."""
  rows = summary["per_lr"]
  lines = [
    f"Validation loss in {unit}: mean ± sample std over seeds.",
    "",
    "| optimizer | chosen lr | seeds | val loss | train loss | "
    "time / step (ms) | mean alpha (median xmin) | mean alpha (KS xmin) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, lr in summary["chosen_lr"].items():
    r = next(
      (r for r in rows if r["optimizer"] == name and r["lr"] == lr), None
    )
    if r is None:
      lines.append(f"| {name} | - | 0 | - | - | - | - | - |")
      continue
    ms = 1e3 * float(
      np.median(
        [
          x["time_per_step_s"]
          for x in runs
          if x["optimizer"] == name and x.get("status") == "ok"
        ]
      )
    )
    lines.append(
      f"| {name} | {lr:g} | {len(r['seeds'])} | "
      f"{_fmt(r['val_loss_mean'], r['val_loss_std'], len(r['seeds']))} | "
      f"{r['train_loss_mean']:.4f} | {ms:.1f} | {r['alpha_median']:.2f} | "
      f"{r['alpha_ks']:.2f} |"
    )
  lines += [
    "",
    "Every learning rate (the chosen one in bold):",
    "",
    "| optimizer | lr | seeds | val loss | time / step (ms) |",
    "|---|---|---|---|---|",
  ]
  for r in rows:
    lr = f"**{r['lr']:g}**" if r["chosen"] else f"{r['lr']:g}"
    lines.append(
      f"| {r['optimizer']} | {lr} | {','.join(map(str, r['seeds']))} | "
      f"{_fmt(r['val_loss_mean'], r['val_loss_std'], len(r['seeds']))} | "
      f"{1e3 * r['time_per_step_s']:.1f} |"
    )
  failed = [r for r in runs if r.get("status") != "ok"]
  if failed:
    lines += ["", "Failed runs:", ""]
    lines += [
      f"- {run_name(r['optimizer'], r['lr'], r['seed'])}: {r.get('error', '?')}"
      for r in failed
    ]
  return "\n".join(lines)


def _write_json(path: str, payload: dict[str, Any]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=1, allow_nan=True)
  os.replace(tmp, path)  # Atomic: an interrupted write keeps the old file.


def run_sweep(
  run_fn: RunFn,
  optimizers: Sequence[str],
  grids: dict[str, list[float]],
  *,
  seeds: Sequence[int] = DEFAULT_SEEDS,
  out_dir: str,
  config: dict[str, Any],
  title: str = "LLaMA-style LM",
  alpha_xmin: str = "median",
  smooth_window: int = 5,
  train: bool = True,
  log: Callable[[str], None] = print,
) -> dict[str, Any]:
  """Runs (or resumes) the sweep and writes its table, JSON and plots.

  Args:
    run_fn: trains one `(optimizer, lr, seed)` and returns its record (the
      keys of `run_record`); may raise, the failure is recorded and the
      sweep goes on.
    optimizers: names, in table order.
    grids: the learning rates of each optimizer.
    seeds: the first selects the learning rate; each further one reruns the
      chosen value.
    out_dir: where everything goes; finished runs found there (under
      `runs/`, with the same `config`) are not run again, runs with another
      config are an error. Several processes may share it, e.g. one per
      subset of the optimizers, then one with all of them for the report.
    config: what defines the sweep (flags), stored and compared on resume.
    title: plot titles.
    alpha_xmin: the estimator of the alpha-over-training plot.
    smooth_window: moving average of the plotted train losses.
    train: `False` trains nothing: the tables and plots of the runs already
      in `out_dir` (e.g. of an interrupted sweep), with `"complete": False`.
    log: progress messages.

  Returns:
    `{"runs", "summary", "table", "plots"}`.

  Raises:
    ValueError: no seeds, or `out_dir` holds a sweep with another config.
  """
  if not seeds:
    raise ValueError("seeds: need at least one seed.")
  runs_dir = os.path.join(out_dir, "runs")
  os.makedirs(runs_dir, exist_ok=True)
  json_path = os.path.join(out_dir, SWEEP_JSON)
  # What makes two runs comparable; the optimizers and grids may differ
  # between invocations that share `out_dir` (e.g. one process per subset of
  # optimizers, then one with all of them that only writes the report).
  config = json.loads(json.dumps({**config, "seeds": list(seeds)}))

  def load_records() -> list[dict[str, Any]]:
    found = []
    for fname in sorted(os.listdir(runs_dir)):
      if not fname.endswith(RECORD_SUFFIX):
        continue
      with open(os.path.join(runs_dir, fname)) as f:
        rec = json.load(f)
      if rec.get("optimizer") not in grids:
        continue  # Another process's share of the sweep.
      if rec.get("config") != config:
        raise ValueError(
          f"out_dir: {out_dir} holds sweep runs with another configuration "
          f"({fname}); choose another --out-dir or remove it."
        )
      if (
        rec.get("status") == "ok"
        and rec["optimizer"] in grids
        and rec["lr"] in grids[rec["optimizer"]]
      ):
        found.append(rec)
    return found

  runs = load_records()
  if runs:
    log(f"resuming: {len(runs)} finished runs in {runs_dir}")
  unit = next((r["unit"] for r in runs if "unit" in r), "nats")

  def save(final: bool = False) -> dict[str, Any]:
    # Re-read: another process may have added runs to the same directory.
    done = {run_name(r["optimizer"], r["lr"], r["seed"]) for r in runs}
    runs.extend(
      r
      for r in load_records()
      if run_name(r["optimizer"], r["lr"], r["seed"]) not in done
    )
    summary = summarize(runs, optimizers, grids, seeds)
    table = tables(summary, runs, unit)
    _write_json(
      json_path,
      {
        "config": {**config, "optimizers": list(optimizers), "grids": grids},
        "complete": final,
        "summary": summary,
        "runs": runs,
      },
    )
    if not final:
      table = (
        "**Partial sweep**: not every run of the grid and seeds is "
        "there (see `complete` in sweep.json).\n\n" + table
      )
    with open(os.path.join(out_dir, SWEEP_MD), "w") as f:
      f.write(table + "\n")
    return {"summary": summary, "table": table}

  def do(name: str, lr: float, seed: int) -> None:
    nonlocal unit
    if not train:
      return
    if any(
      r["optimizer"] == name and r["lr"] == lr and r["seed"] == seed
      for r in runs
    ):
      return
    path = os.path.join(out_dir, "runs", run_name(name, lr, seed) + ".json")
    log(f"[sweep] {run_name(name, lr, seed)} ...")
    t0 = time.time()
    try:
      record = {**run_fn(name, lr, seed, path), "status": "ok"}
      unit = record.get("unit", unit)
    except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on.
      traceback.print_exc()
      record = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    record.update(
      optimizer=name,
      lr=lr,
      seed=seed,
      wall_s=time.time() - t0,
      metrics_json=os.path.relpath(path, out_dir),
      config=config,
    )
    runs.append(record)
    if record["status"] == "ok":
      _write_json(
        os.path.join(runs_dir, run_name(name, lr, seed) + RECORD_SUFFIX), record
      )
    save()
    log(
      f"[sweep] {run_name(name, lr, seed)}: {record['status']}, val loss "
      f"{record.get('final_val_loss', float('nan')):.4f}, "
      f"{record['wall_s']:.0f} s"
    )

  # Phase 1, learning rate by learning rate across the optimizers (in the
  # grids' order: compare.py puts the paper value first), so that an
  # interrupted sweep has every optimizer at comparable points.
  width = max(len(g) for g in grids.values())
  for i in range(width):
    for name in optimizers:
      if i < len(grids[name]):
        do(name, grids[name][i], seeds[0])
  # Phase 2: the other seeds at each chosen learning rate.
  for seed in seeds[1:]:
    for name in optimizers:
      best = choose_lr(runs, name, seeds[0])
      if best is not None:
        do(name, best, seed)

  missing = [
    run_name(n, lr, seeds[0])
    for n in optimizers
    for lr in grids[n]
    if not any(
      r["optimizer"] == n and r["lr"] == lr and r["seed"] == seeds[0]
      for r in runs
    )
  ]
  summary = summarize(runs, optimizers, grids, seeds)
  missing += [
    run_name(n, summary["chosen_lr"][n], s)
    for n in optimizers
    for s in seeds[1:]
    if summary["chosen_lr"][n] is not None
    and not any(
      r["optimizer"] == n
      and r["seed"] == s
      and r["lr"] == summary["chosen_lr"][n]
      for r in runs
    )
  ]
  if missing:
    log(f"[sweep] incomplete, missing runs: {', '.join(missing)}")
  out = save(final=not missing)
  out["plots"] = plot_sweep(
    runs,
    out["summary"],
    optimizers,
    out_dir,
    title=title,
    unit=unit,
    alpha_xmin=alpha_xmin,
    smooth_window=smooth_window,
  )
  out["runs"] = runs
  return out


def plot_sweep(
  runs: Sequence[dict[str, Any]],
  summary: dict[str, Any],
  optimizers: Sequence[str],
  out_dir: str,
  *,
  title: str,
  unit: str,
  alpha_xmin: str,
  smooth_window: int,
) -> list[str]:
  """`lr_sweep.png`, `loss_curves.png`, `alpha_over_training.png`."""
  ok = [r for r in runs if r.get("status") == "ok"]
  chosen = summary["chosen_lr"]
  selection_seed = min((r["seed"] for r in ok), default=0)
  points, at_best, curves, alphas = {}, {}, {}, {}
  for name in optimizers:
    mine = [r for r in ok if r["optimizer"] == name]
    sel = [r for r in mine if r["seed"] == selection_seed]
    points[name] = [
      (r["lr"], r["final_val_loss"])
      for r in sel
      if math.isfinite(r["final_val_loss"])
    ]
    best = [r for r in mine if r["lr"] == chosen.get(name)]
    if best:
      at_best[name] = (chosen[name], [r["final_val_loss"] for r in best])
      curves[f"{name}"] = [{"train": r["train"], "val": r["val"]} for r in best]
      alphas[name] = [r.get("alpha_history", []) for r in best]
  plots = [
    compare_plots.plot_lr_sweep(
      points,
      at_best,
      os.path.join(out_dir, "lr_sweep.png"),
      title=f"{title}: final validation loss vs peak learning rate",
      unit=unit,
    ),
    compare_plots.plot_loss_curves(
      curves,
      os.path.join(out_dir, "loss_curves.png"),
      title=f"{title}, chosen lr",
      unit=unit,
      smooth_window=smooth_window,
    ),
  ]
  if any(any(h) for h in alphas.values()):
    plots.append(
      compare_plots.plot_alpha_over_training(
        alphas,
        os.path.join(out_dir, "alpha_over_training.png"),
        title=f"{title}: mean alpha of the weight matrices, chosen lr "
        "(lower = heavier tail)",
        xmin=alpha_xmin,
      )
    )
  return plots


def run_record(
  result: dict[str, Any], alpha_ks: float, alpha_median: float, unit: str
) -> dict[str, Any]:
  """The part of a training script's result that the sweep keeps."""
  return {
    "final_val_loss": float(result["final_val_loss"]),
    "final_train_loss": float(result["final_train_loss"]),
    "time_per_step_s": float(result["time_per_step_s"]),
    "train": result["train"],
    "val": result["val"],
    "alpha_history": [
      {"step": a["step"], "mean_alpha": a["mean_alpha"], "xmin": a["xmin"]}
      for a in result.get("alpha", [])
    ],
    "alpha_ks": float(alpha_ks),
    "alpha_median": float(alpha_median),
    "unit": unit,
  }
