"""Plots of `compare.py` and its `--sweep`: one colour per optimizer everywhere.

Every figure is saved with `bbox_inches="tight"` (no clipped labels or
legends) and uses the colour of `optimizer_color`, so an optimizer looks the
same in the loss curves, the alpha plots and the learning-rate sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

# Fixed colours (matplotlib's tab10) so that an optimizer keeps its colour
# whatever subset of optimizers a comparison runs; the initialization is grey.
OPTIMIZER_COLORS = {
  "init": "#7f7f7f",
  "adamw": "#1f77b4",
  "muon": "#ff7f0e",
  "htmuon": "#2ca02c",
  "rmnp": "#d62728",
  "optax_muon": "#9467bd",
  "htnormuon": "#8c564b",
  "htadamuon": "#e377c2",
  "normuon": "#bcbd22",
  "adamuon": "#17becf",
}
_SPARE = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")


def optimizer_color(name: str) -> str:
  """The colour of optimizer `name` in every plot."""
  if name in OPTIMIZER_COLORS:
    return OPTIMIZER_COLORS[name]
  return _SPARE[sum(map(ord, name)) % len(_SPARE)]


def loss_unit(config: dict[str, Any]) -> str:
  """`nats/char`, `nats/byte` or `nats/example`, from a run's config."""
  tokenizer = config.get("tokenizer")
  if tokenizer == "char":
    return "nats/char"
  if tokenizer == "byte":
    return "nats/byte"
  return "nats/example"


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save(fig: Any, path: str) -> str:
  fig.savefig(path, dpi=120, bbox_inches="tight")
  _pyplot().close(fig)
  return path


def _plain_log_ticks(axis: Any) -> None:
  # Losses span well under a decade: label log axes 1.5, 2, 3 (not 2x10^0).
  from matplotlib import ticker

  axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
  axis.set_minor_formatter(ticker.FormatStrFormatter("%g"))


def _marker(n_points: int) -> Optional[str]:
  # A single point (e.g. steps <= log_every) is invisible as a line.
  return "o" if n_points < 20 else None


def _band(
  ax: Any,
  steps: Sequence[float],
  runs: list[Sequence[float]],
  color: str,
  label: str,
) -> None:
  """Mean over runs as a line, min..max over runs as a band."""
  y = np.asarray(runs, np.float64)
  mean = np.nanmean(y, axis=0)
  ax.plot(
    steps, mean, color=color, marker=_marker(len(steps)), ms=3, label=label
  )
  if len(runs) > 1:
    ax.fill_between(
      steps,
      np.nanmin(y, axis=0),
      np.nanmax(y, axis=0),
      color=color,
      alpha=0.2,
      lw=0,
    )


def _common_curve(
  histories: list[list[dict[str, Any]]], key: str = "loss"
) -> tuple[list[int], list[list[float]]]:
  """Steps common to every history and each history's values there."""
  if not histories:
    return [], []
  common = set(p["step"] for p in histories[0])
  for h in histories[1:]:
    common &= set(p["step"] for p in h)
  steps = sorted(common)
  return steps, [
    [{p["step"]: p[key] for p in h}[s] for s in steps] for h in histories
  ]


def smooth(values: Sequence[float], window: int) -> np.ndarray:
  """Trailing moving average (the first points average what there is)."""
  v = np.asarray(values, np.float64)
  if window <= 1 or len(v) == 0:
    return v
  c = np.cumsum(np.insert(v, 0, 0.0))
  idx = np.arange(1, len(v) + 1)
  lo = np.maximum(0, idx - window)
  return (c[idx] - c[lo]) / (idx - lo)


def plot_loss_curves(
  runs: dict[str, list[dict[str, Any]]],
  path: str,
  *,
  title: str,
  unit: str,
  smooth_window: int = 1,
) -> str:
  """Train and validation loss per step; a band over the runs of a label.

  Args:
    runs: `{optimizer: [history, ...]}`, each history with `"train"` and
      `"val"` lists of `{"step", "loss"}` (several histories: seeds).
    path: the PNG to write.
    title: plot title prefix.
    unit: the loss unit for the y axes (e.g. `nats/char`).
    smooth_window: moving average over this many logged train losses.

  Returns:
    `path`.
  """
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
  for name, hs in runs.items():
    color = optimizer_color(name)
    seeds = f" ({len(hs)} seeds)" if len(hs) > 1 else ""
    for ax, key in zip(axes, ("train", "val")):
      steps, ys = _common_curve([h[key] for h in hs])
      if not steps:
        continue
      if key == "train":
        ys = [smooth(y, smooth_window) for y in ys]
      _band(
        ax,
        steps,
        ys,
        color,
        name + seeds + (": mean, min..max band" if seeds else ""),
      )
  for ax, what in zip(axes, ("train loss", "validation loss")):
    extra = (
      f", moving average of {smooth_window} logs"
      if what == "train loss" and smooth_window > 1
      else ""
    )
    ax.set_xlabel("step")
    ax.set_ylabel(f"{what} ({unit})")
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    ax.set_title(f"{title}: {what}{extra}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def short_matrix_name(name: str) -> str:
  """`blocks/0/attn/q/kernel` -> `0/attn/q` (tick labels)."""
  parts = [
    p
    for p in name.split("/")
    if p not in ("kernel", "embedding", "blocks", "value")
  ]
  return "/".join(parts) or name


def plot_final_alphas(
  tables: dict[str, Sequence[Any]], path: str, *, title: str
) -> str:
  """Per-matrix alpha at the end of training, one marker per optimizer.

  Args:
    tables: `{label: rows}` of `diagnostics.layer_alphas` (or dicts with
      `name` and `alpha`), matched by position.
    path: the PNG to write.
    title: plot title.

  Returns:
    `path`.
  """
  plt = _pyplot()
  names: list[str] = []
  for rows in tables.values():
    names = names or [getattr(r, "name", None) or r["name"] for r in rows]
  fig, ax = plt.subplots(figsize=(max(8.0, 0.32 * len(names) + 2), 4.8))
  width = 0.6 / max(1, len(tables))
  for k, (label, rows) in enumerate(tables.items()):
    alphas = np.asarray(
      [
        getattr(r, "alpha", None) if not isinstance(r, dict) else r["alpha"]
        for r in rows
      ],
      np.float64,
    )
    x = np.arange(len(alphas)) + (k - (len(tables) - 1) / 2) * width
    ax.plot(
      x,
      alphas,
      ls="none",
      marker="o",
      ms=4,
      color=optimizer_color(label),
      label=f"{label} (mean {np.nanmean(alphas):.2f})",
    )
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(
    [short_matrix_name(n) for n in names], rotation=60, ha="right", fontsize=8
  )
  ax.set_xlim(-0.6, len(names) - 0.4)
  ax.set_ylabel("power-law alpha (lower = heavier tail)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=8, ncol=min(5, len(tables)))
  fig.tight_layout()
  return _save(fig, path)


def plot_alpha_over_training(
  runs: dict[str, list[list[dict[str, Any]]]],
  path: str,
  *,
  title: str,
  xmin: str,
) -> str:
  """Mean alpha of the weight matrices against the step, per optimizer.

  Args:
    runs: `{optimizer: [alpha history, ...]}`, each history a list of
      `{"step", "mean_alpha"}` (an `AlphaMonitor`'s snapshots), one per seed.
    path: the PNG to write.
    title: plot title.
    xmin: the estimator's name, for the axis label.

  Returns:
    `path`.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for name, hs in runs.items():
    hs = [h for h in hs if h]
    if not hs:
      continue
    steps, ys = _common_curve(hs, key="mean_alpha")
    seeds = f" ({len(hs)} seeds)" if len(hs) > 1 else ""
    y = np.asarray(ys, np.float64)
    ax.plot(
      steps,
      np.nanmean(y, axis=0),
      marker="o",
      ms=4,
      color=optimizer_color(name),
      label=name + seeds + (": mean, min..max band" if seeds else ""),
    )
    if len(hs) > 1:
      ax.fill_between(
        steps,
        np.nanmin(y, axis=0),
        np.nanmax(y, axis=0),
        color=optimizer_color(name),
        alpha=0.2,
        lw=0,
      )
  ax.set_xlabel("step")
  ax.set_ylabel(f"mean power-law alpha ({xmin} xmin)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def plot_lr_sweep(
  points: dict[str, list[tuple[float, float]]],
  seeds_at_best: dict[str, tuple[float, list[float]]],
  path: str,
  *,
  title: str,
  unit: str,
) -> str:
  """Validation loss against the learning rate (log x), per optimizer.

  Args:
    points: `{optimizer: [(lr, val loss of the selection seed), ...]}`.
    seeds_at_best: `{optimizer: (chosen lr, [val loss per seed])}`; drawn as
      the mean with a min..max bar.
    path: the PNG to write.
    title: plot title.
    unit: loss unit.

  Returns:
    `path`.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, pts in points.items():
    pts = sorted(pts)
    color = optimizer_color(name)
    ax.plot(
      [p[0] for p in pts],
      [p[1] for p in pts],
      "o-",
      ms=5,
      color=color,
      label=f"{name} (selection seed)",
    )
    if name in seeds_at_best:
      lr, losses = seeds_at_best[name]
      v = np.asarray(losses, np.float64)
      mean = float(np.nanmean(v))
      ax.errorbar(
        [lr],
        [mean],
        yerr=[[mean - np.nanmin(v)], [np.nanmax(v) - mean]],
        fmt="*",
        ms=13,
        color=color,
        capsize=4,
        markeredgecolor="black",
        label=f"{name}: chosen lr {lr:g}, mean and min..max of {len(v)} seeds",
      )
  ax.set_xscale("log")
  lrs = sorted({p[0] for pts in points.values() for p in pts})
  if lrs:  # Label the grid's values, not powers of ten.
    from matplotlib import ticker

    ax.xaxis.set_major_locator(ticker.FixedLocator(lrs))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
  ax.set_xlabel("peak learning rate (log scale)")
  ax.set_ylabel(f"final validation loss ({unit})")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  return _save(fig, path)
