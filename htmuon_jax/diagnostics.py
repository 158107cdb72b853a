"""Heavy-tailed self-regularization (HT-SR) metrics of weight matrices.

The empirical spectral density (ESD) of a weight matrix `W` is the set of
eigenvalues of `W^T W`, i.e. `svdvals(W) ** 2`. HT-SR theory (Martin &
Mahoney) fits a power law `p(lam) ~ lam ** -alpha` to its tail: a smaller
`alpha` is a heavier tail, which correlates with better-trained layers. The
HTMuon paper reports smaller alphas for HTMuon than for Muon.

Two estimators of `alpha` are in common use and give very different numbers on
the same matrix, so this module always names the one it uses:

* `xmin="ks"`: Clauset, Shalizi & Newman (2009), as WeightWatcher and the
  `powerlaw` package: every eigenvalue is tried as `xmin`, and the one whose
  fit has the smallest Kolmogorov-Smirnov distance wins.
* `xmin="median"`: the HTMuon authors' (and TempBalance's) choice,
  `xmin` = the median eigenvalue.

For a given `xmin` both use the continuous maximum-likelihood (Hill) estimate
`alpha = 1 + n / sum_{lam >= xmin} log(lam / xmin)`.

Everything here is jit-compatible: shapes are fixed and masks replace boolean
indexing.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from htmuon_jax import _layouts as dn
from htmuon_jax import _numerics as numerics

__all__ = [
  "LayerAlpha",
  "esd",
  "powerlaw_alpha",
  "layer_alphas",
  "tree_alphas",
  "AlphaSnapshot",
  "AlphaMonitor",
  "format_alpha_table",
  "plot_esd",
  "plot_layer_alphas",
]

XminRule = Literal["ks", "median"]
XMIN_RULES = ("ks", "median")

# Eigenvalues at or below this are numerically zero and left out of the fit,
# as in the HT-SR code (`EVALS_THRESH = 1e-5`) and WeightWatcher.
DEFAULT_MIN_EIGENVALUE = 1e-5


def esd(w: jax.Array) -> jax.Array:
  """Empirical spectral density: the eigenvalues of `W^T W`.

  Args:
    w: a matrix `(m, n)`, or a batch `(..., m, n)` of them.

  Returns:
    `svdvals(w) ** 2` in float32, shape `(..., min(m, n))`, descending.
  """
  w = jnp.asarray(w)
  if w.ndim < 2:
    raise ValueError(f"w: esd needs a matrix, got shape {w.shape}.")
  # A non-finite matrix never reaches LAPACK (it may hang): NaN eigenvalues.
  w, finite = numerics.finite_matrices(w.astype(jnp.float32))
  s = numerics.lapack_per_matrix(
    lambda m: jnp.linalg.svd(m, compute_uv=False), w
  )
  s = jnp.where(finite[..., 0], s, jnp.nan)
  return s * s


def _check_xmin(xmin: str) -> None:
  if xmin not in XMIN_RULES:
    raise ValueError(f"xmin: must be one of {XMIN_RULES}, got {xmin!r}.")


def powerlaw_alpha(
  eigenvalues: jax.Array,
  *,
  xmin: XminRule = "ks",
  min_eigenvalue: float = DEFAULT_MIN_EIGENVALUE,
) -> tuple[jax.Array, jax.Array]:
  """Power-law exponent of the tail of an ESD.

  Eigenvalues `<= min_eigenvalue` are dropped first (numerical zeros). Among
  the `N` remaining ones, sorted ascending as `lam_0 <= ... <= lam_{N-1}`, a
  candidate `xmin = lam_i` gives `n = N - i` tail points and

    alpha_i = 1 + n / sum_{j >= i} log(lam_j / lam_i).

  With `xmin="ks"` the candidate minimizing the Kolmogorov-Smirnov distance
  `D_i = max_{j >= i} |1 - (lam_j / lam_i) ** (1 - alpha_i) - (j - i) / n|`
  is chosen (candidates `i < N - 1` with `alpha_i > 1`, the first of tied
  eigenvalues only, as the `powerlaw` package does). With `xmin="median"`,
  `i = N // 2`.

  Args:
    eigenvalues: a 1-D array of eigenvalues (e.g. from `esd`), any order.
    xmin: `"ks"` (WeightWatcher / Clauset et al.) or `"median"` (HTMuon
      authors).
    min_eigenvalue: eigenvalues at or below it are treated as zero and left
      out.

  Returns:
    `(alpha, xmin_value)` as float32 scalars; both NaN when fewer than two
    eigenvalues exceed `min_eigenvalue` (e.g. a zero matrix).

  References:
    Clauset, Shalizi & Newman, `Power-law distributions in empirical data
    <https://arxiv.org/abs/0706.1062>`_, SIAM Review 2009.

    Martin & Mahoney, `Implicit self-regularization in deep neural networks
    <https://arxiv.org/abs/1810.01075>`_, JMLR 2021.
  """
  _check_xmin(xmin)
  lam = jnp.asarray(eigenvalues, jnp.float32)
  if lam.ndim != 1:
    raise ValueError(
      f"eigenvalues: expected a 1-D array, got shape {lam.shape}."
    )
  size = lam.shape[0]
  lam = jnp.sort(lam)
  valid = lam > min_eigenvalue
  num_valid = jnp.sum(valid)
  first = size - num_valid  # Index of the smallest valid eigenvalue.
  # Invalid entries become 1 so their logs are 0 and nothing divides by 0.
  safe = jnp.where(valid, lam, 1.0)
  logs = jnp.log(safe)
  # tail_log_sum[i] = sum_{j >= i} log(lam_j), a reversed cumulative sum.
  tail_log_sum = jnp.cumsum(logs[::-1])[::-1]
  idx = jnp.arange(size)
  n_tail = (size - idx).astype(jnp.float32)
  denom = tail_log_sum - n_tail * logs
  alphas = 1.0 + n_tail / jnp.where(denom > 0, denom, jnp.inf)

  if xmin == "median":
    best = first + num_valid // 2
  else:

    def ks_distance(i: jax.Array) -> jax.Array:
      a = alphas[i]
      ratio = safe / safe[i]
      fitted = 1.0 - ratio ** (1.0 - a)
      empirical = (idx - i) / n_tail[i]
      diff = jnp.where(idx >= i, jnp.abs(fitted - empirical), 0.0)
      return jnp.max(diff)

    distances = jax.lax.map(ks_distance, idx, batch_size=min(size, 128))
    previous = jnp.concatenate([jnp.full((1,), -jnp.inf, lam.dtype), lam[:-1]])
    candidate = (
      (idx >= first) & (idx < size - 1) & (alphas > 1.0) & (lam > previous)
    )
    best = jnp.argmin(jnp.where(candidate, distances, jnp.inf))

  ok = num_valid >= 2
  alpha = jnp.where(ok, alphas[best], jnp.nan)
  xmin_value = jnp.where(ok, lam[best], jnp.nan)
  return alpha, xmin_value


# Module level, so repeated tables (e.g. one per optimizer) reuse compilations.
@functools.partial(jax.jit, static_argnames=("xmin",))
def _batched_fit(
  lam: jax.Array, xmin: Literal["ks", "median"], min_eigenvalue: float
):
  return jax.vmap(
    lambda l: powerlaw_alpha(l, xmin=xmin, min_eigenvalue=min_eigenvalue)
  )(lam)


class LayerAlpha(NamedTuple):
  """One row of `layer_alphas`: one matrix of a parameter."""

  name: str  # Parameter path, with `[i]` for the i-th matrix of a batch.
  shape: tuple[int, int]  # (fan_in, fan_out) of the matrix.
  alpha: float
  xmin: float
  num_eigenvalues: int
  spectral_norm: float  # Largest singular value.


def _path_name(path: tuple[Any, ...]) -> str:
  return "/".join(dn._keys(path))  # without a Flax box's `.value`


def _matrices(params: Any, weight_dimension_numbers: Any) -> Any:
  """`(batch, fan_in, fan_out)` stacks of the matrix leaves, `None` elsewhere."""
  dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, params)
  return dn.map_with_dimension_numbers(
    lambda d, x: None if d is None else dn.to_matrices(jnp.asarray(x), d),
    dim_tree,
    params,
  )


def layer_alphas(
  params: Any,
  *,
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  xmin: XminRule = "ks",
  min_eigenvalue: float = DEFAULT_MIN_EIGENVALUE,
) -> list[LayerAlpha]:
  """Power-law alpha of every weight matrix in a params pytree.

  Args:
    params: a pytree of arrays (e.g. `nnx.state(model, nnx.Param)` or a pure
      dict).
    weight_dimension_numbers: which leaves are matrices, as in
      `htmuon_jax.htmuon` (`None`: the default routing). A leaf with batch axes
      (stacked layers) gives one row per matrix.
    xmin: `"ks"` or `"median"`; see `powerlaw_alpha`.
    min_eigenvalue: see `powerlaw_alpha`.

  Returns:
    A list of `LayerAlpha` rows in the params' flattening order.
  """
  _check_xmin(xmin)
  rows = []
  tree = _matrices(params, weight_dimension_numbers)
  for path, mats in jax.tree_util.tree_flatten_with_path(tree)[0]:
    lam = esd(mats)
    alpha, xm = jax.device_get(_batched_fit(lam, xmin, min_eigenvalue))
    norms = np.sqrt(np.asarray(jax.device_get(lam[:, 0])))
    name = _path_name(path)
    for i in range(mats.shape[0]):
      rows.append(
        LayerAlpha(
          name=name if mats.shape[0] == 1 else f"{name}[{i}]",
          shape=(int(mats.shape[1]), int(mats.shape[2])),
          alpha=float(alpha[i]),
          xmin=float(xm[i]),
          num_eigenvalues=int(lam.shape[-1]),
          spectral_norm=float(norms[i]),
        )
      )
  return rows


def tree_alphas(
  params: Any,
  *,
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  xmin: XminRule = "median",
  min_eigenvalue: float = DEFAULT_MIN_EIGENVALUE,
) -> Any:
  """`layer_alphas`' estimate as a pytree like `params` (jit-compatible).

  Args:
    params: a pytree of arrays.
    weight_dimension_numbers: as in `layer_alphas`.
    xmin: `"median"` (default, the HTMuon authors') or `"ks"`; see
      `powerlaw_alpha`.
    min_eigenvalue: see `powerlaw_alpha`.

  Returns:
    A tree like `params`: float32 `(num_matrices,)` alphas (in `layer_alphas`
    order) for matrix leaves, `None` for the others.
  """
  _check_xmin(xmin)
  fit = lambda m: _batched_fit(esd(m), xmin, min_eigenvalue)[0]
  return jax.tree.map(fit, _matrices(params, weight_dimension_numbers))


class AlphaSnapshot(NamedTuple):
  """What `AlphaMonitor` returns on the steps it measures."""

  step: int
  xmin: str  # The estimator: "median" or "ks".
  mean_alpha: float  # Mean over the matrices with a finite alpha.
  alphas: dict[str, list[float]]  # Parameter path -> alpha per matrix.


class AlphaMonitor:
  """Per-matrix power-law alpha every `every` steps (one jitted call; nothing
  on the other steps), for any training loop:

      monitor = diagnostics.AlphaMonitor(every=200, xmin="median")
      for step in range(1, steps + 1):
        params, opt_state = train_step(params, opt_state, batch(step))
        snap = monitor(step, params)
        if snap is not None:
          print(step, snap.mean_alpha)

  Args:
    weight_dimension_numbers: which leaves are matrices, as in
      `htmuon_jax.htmuon` (`None`: the default routing; a callable is called
      on the params).
    every: the period in steps (step 0, the initialization, is measured too).
    xmin: the estimator, `"median"` (default, the HTMuon authors') or `"ks"`
      (WeightWatcher); see `powerlaw_alpha`. Every snapshot names it.
    min_eigenvalue: see `powerlaw_alpha`.

  Raises:
    ValueError: `every < 1` or an unknown `xmin`.
  """

  def __init__(
    self,
    weight_dimension_numbers: dn.WeightDimNumOrFn = None,
    *,
    every: int = 200,
    xmin: XminRule = "median",
    min_eigenvalue: float = DEFAULT_MIN_EIGENVALUE,
  ):
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
      raise ValueError(f"every: must be an integer >= 1, got {every!r}.")
    _check_xmin(xmin)
    self.every, self.xmin = every, xmin
    self._fit = jax.jit(
      functools.partial(
        tree_alphas,
        weight_dimension_numbers=weight_dimension_numbers,
        xmin=xmin,
        min_eigenvalue=min_eigenvalue,
      )
    )

  def due(self, step: int) -> bool:
    """Whether `step` is one the monitor measures."""
    return int(step) % self.every == 0

  def alphas(self, params: Any) -> dict[str, list[float]]:
    """Alpha of every matrix now, `{parameter path: [alpha per matrix]}`."""
    tree = jax.device_get(self._fit(params))
    return {
      _path_name(path): [float(a) for a in np.ravel(leaf)]
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }

  def __call__(self, step: int, params: Any) -> Optional[AlphaSnapshot]:
    """An `AlphaSnapshot` on due steps, `None` on the others."""
    if not self.due(step):
      return None
    alphas = self.alphas(params)
    values = [a for v in alphas.values() for a in v if np.isfinite(a)]
    mean = float(np.mean(values)) if values else float("nan")
    return AlphaSnapshot(
      step=int(step), xmin=self.xmin, mean_alpha=mean, alphas=alphas
    )


def format_alpha_table(rows: list[LayerAlpha], *, digits: int = 3) -> str:
  """A markdown table of `layer_alphas` rows."""
  lines = [
    "| matrix | fan_in x fan_out | alpha | xmin | sigma_max |",
    "|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r.name} | {r.shape[0]} x {r.shape[1]} | {r.alpha:.{digits}f} | "
      f"{r.xmin:.{digits}g} | {r.spectral_norm:.{digits}g} |"
    )
  return "\n".join(lines)


def _pyplot():
  # Imported lazily: matplotlib is an optional dependency (the examples extra).
  import matplotlib.pyplot as plt

  return plt


def plot_esd(
  eigenvalues: Any,
  *,
  xmin: XminRule = "ks",
  ax: Optional[Any] = None,
  label: Optional[str] = None,
  min_eigenvalue: float = DEFAULT_MIN_EIGENVALUE,
) -> Any:
  """Log-log histogram of an ESD with its fitted power-law tail.

  Args:
    eigenvalues: 1-D eigenvalues (e.g. `esd(w)`).
    xmin: the estimator to fit and draw (see `powerlaw_alpha`).
    ax: a matplotlib axis; a new figure is made if `None`.
    label: legend label prefix.
    min_eigenvalue: see `powerlaw_alpha`.

  Returns:
    The matplotlib axis.
  """
  plt = _pyplot()
  if ax is None:
    _, ax = plt.subplots(figsize=(5, 4))
  lam = np.asarray(jax.device_get(eigenvalues), np.float64)
  fit = powerlaw_alpha(
    jnp.asarray(lam), xmin=xmin, min_eigenvalue=min_eigenvalue
  )
  alpha, xm = (float(v) for v in jax.device_get(fit))
  lam = lam[lam > min_eigenvalue]
  bins = np.logspace(np.log10(lam.min()), np.log10(lam.max()), 40)
  density, edges, _ = ax.hist(
    lam, bins=bins, density=True, alpha=0.5, label=f"{label or 'ESD'}"
  )
  if np.isfinite(alpha):
    # Fitted density of the tail, scaled by the tail's share of the mass.
    share = np.mean(lam >= xm)
    x = np.logspace(np.log10(xm), np.log10(lam.max()), 50)
    y = share * (alpha - 1) / xm * (x / xm) ** (-alpha)
    name = f"{label + ': ' if label else ''}alpha={alpha:.2f} ({xmin})"
    ax.plot(x, y, "--", label=name)
    ax.axvline(xm, color="gray", lw=0.8, ls=":")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("eigenvalue of W^T W")
  ax.set_ylabel("density")
  ax.legend(fontsize=8)
  return ax


def plot_layer_alphas(
  tables: dict[str, list[LayerAlpha]],
  *,
  ax: Optional[Any] = None,
  title: Optional[str] = None,
) -> Any:
  """Per-layer alphas of several models (e.g. one per optimizer).

  Args:
    tables: `{label: layer_alphas(...) rows}`; rows are matched by position.
    ax: a matplotlib axis; a new figure is made if `None`.
    title: axis title.

  Returns:
    The matplotlib axis.
  """
  plt = _pyplot()
  if ax is None:
    _, ax = plt.subplots(figsize=(8, 4))
  names = None
  # Markers only (the matrices are unrelated, a line would suggest an order),
  # side by side so that equal values stay visible.
  width = 0.6 / max(1, len(tables))
  for k, (label, rows) in enumerate(tables.items()):
    x = np.arange(len(rows)) + (k - (len(tables) - 1) / 2) * width
    alphas = [r.alpha for r in rows]
    legend = f"{label} (mean {np.nanmean(alphas):.2f})"
    ax.plot(x, alphas, ls="none", marker="o", ms=4, label=legend)
    names = names or [r.name for r in rows]
  if names:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("power-law alpha")
  if title:
    ax.set_title(title)
  ax.legend(fontsize=8)
  return ax
