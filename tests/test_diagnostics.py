"""Tests of htmuon_jax.diagnostics against numpy float64 references."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from htmuon_jax import diagnostics
from htmuon_jax import MuonDimensionNumbers


def ref_fit(lam, xmin_rule, min_eigenvalue=1e-5):
  """Independent float64 re-implementation (loops, no masks)."""
  lam = np.sort(np.asarray(lam, np.float64))
  lam = lam[lam > min_eigenvalue]
  n_all = len(lam)

  def fit(i):
    tail = lam[i:]
    n = len(tail)
    alpha = 1.0 + n / np.sum(np.log(tail / tail[0]))
    d = np.max(np.abs(1 - (tail / tail[0]) ** (1 - alpha) - np.arange(n) / n))
    return alpha, d

  if xmin_rule == "median":
    i = n_all // 2
    return fit(i)[0], lam[i]
  best = None
  for i in range(n_all - 1):
    if i > 0 and lam[i] == lam[i - 1]:
      continue
    alpha, d = fit(i)
    if alpha > 1 and (best is None or d < best[0]):
      best = (d, alpha, lam[i])
  return best[1], best[2]


def pareto(rng, alpha, n, xmin=1.0):
  """Continuous power law p(x) ~ x**-alpha on [xmin, inf)."""
  return xmin * (1.0 - rng.random(n)) ** (-1.0 / (alpha - 1.0))


def spectrum_with_bulk(seed, alpha, n_tail=400, n_bulk=200):
  rng = np.random.default_rng(seed)
  return np.concatenate(
    [pareto(rng, alpha, n_tail), rng.uniform(0.05, 1.0, n_bulk)]
  )


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.5, 5.0])
@pytest.mark.parametrize("xmin", ["ks", "median"])
def test_matches_numpy_reference(alpha, xmin):
  lam = spectrum_with_bulk(int(alpha * 10), alpha)
  got_alpha, got_xmin = diagnostics.powerlaw_alpha(jnp.asarray(lam), xmin=xmin)
  want_alpha, want_xmin = ref_fit(lam.astype(np.float32), xmin)
  # Same candidate xmin (an exact input value); alpha is a float32 sum of
  # ~500 logs vs float64: relative error ~1e-6 * sqrt(n), so 1e-4 is ample.
  np.testing.assert_allclose(float(got_xmin), want_xmin, rtol=1e-6)
  np.testing.assert_allclose(float(got_alpha), want_alpha, rtol=1e-4)


@pytest.mark.parametrize("alpha", [2.0, 2.5])
def test_ks_matches_powerlaw_package(alpha):
  import powerlaw

  lam = spectrum_with_bulk(7, alpha).astype(np.float32).astype(np.float64)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fit = powerlaw.Fit(lam, verbose=False)
  # powerlaw 2.x bounds alpha to (1, 3], so only exponents below 3 compare.
  got_alpha, got_xmin = diagnostics.powerlaw_alpha(jnp.asarray(lam), xmin="ks")
  np.testing.assert_allclose(float(got_xmin), fit.xmin, rtol=1e-6)
  np.testing.assert_allclose(float(got_alpha), fit.alpha, rtol=1e-4)


@pytest.mark.parametrize("alpha", [1.8, 2.5, 4.0])
def test_recovers_known_exponent(alpha):
  # A pure power law: the Hill estimate has std (alpha - 1) / sqrt(n_tail);
  # with n = 4000 and the KS tail holding most points, 5 std is < 0.15 alpha.
  lam = pareto(np.random.default_rng(1), alpha, 4000, xmin=0.5)
  got, xmin = diagnostics.powerlaw_alpha(jnp.asarray(lam), xmin="ks")
  n_tail = np.sum(lam >= float(xmin))
  assert abs(float(got) - alpha) < 5 * (alpha - 1) / np.sqrt(n_tail)
  got_med, _ = diagnostics.powerlaw_alpha(jnp.asarray(lam), xmin="median")
  assert abs(float(got_med) - alpha) < 5 * (alpha - 1) / np.sqrt(2000)


def test_jit_and_vmap_and_zero_eigenvalues():
  lam = spectrum_with_bulk(3, 2.5)
  padded = np.concatenate([lam, np.zeros(50)])  # Numerical zeros are dropped.
  fit = jax.jit(lambda x: diagnostics.powerlaw_alpha(x, xmin="ks"))
  a1, x1 = fit(jnp.asarray(lam))
  a2, x2 = fit(jnp.asarray(np.random.default_rng(0).permutation(padded)))
  chex.assert_trees_all_close((a1, x1), (a2, x2), rtol=1e-6)
  batched = jax.vmap(fit)(jnp.stack([jnp.asarray(padded)] * 2))
  chex.assert_trees_all_close(batched[0], jnp.stack([a1, a1]), rtol=1e-6)


def test_degenerate_inputs_give_nan():
  for lam in (jnp.zeros(8), jnp.array([0.0, 0.0, 3.0])):
    alpha, xmin = diagnostics.powerlaw_alpha(lam)
    assert np.isnan(float(alpha)) and np.isnan(float(xmin))
  assert np.all(np.asarray(diagnostics.esd(jnp.zeros((4, 3)))) == 0)


def test_esd_matches_numpy():
  w = np.random.default_rng(0).normal(size=(2, 12, 7))
  got = diagnostics.esd(jnp.asarray(w, jnp.float32))
  want = np.linalg.svd(w, compute_uv=False) ** 2
  # float32 SVD: relative error ~1e-6 on eigenvalues of a 12x7 Gaussian.
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)


def test_bad_arguments():
  with pytest.raises(ValueError, match="xmin"):
    diagnostics.powerlaw_alpha(jnp.ones(4), xmin="mean")
  with pytest.raises(ValueError, match="eigenvalues"):
    diagnostics.powerlaw_alpha(jnp.ones((2, 2)))
  with pytest.raises(ValueError, match="w"):
    diagnostics.esd(jnp.ones(3))


def test_layer_alphas_uses_dimension_numbers():
  rng = np.random.default_rng(0)
  params = {
    "dense": jnp.asarray(rng.normal(size=(16, 24)), jnp.float32),
    "bias": jnp.zeros(24),
    "stacked": jnp.asarray(rng.normal(size=(3, 16, 8)), jnp.float32),
    "conv": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32),
  }
  dims = {
    "dense": MuonDimensionNumbers(),
    "bias": None,
    "stacked": MuonDimensionNumbers(reduction_axis=1, output_axis=2),
    "conv": MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3),
  }
  rows = diagnostics.layer_alphas(
    params, weight_dimension_numbers=dims, xmin="median"
  )
  names = [r.name for r in rows]
  assert names == ["conv", "dense", "stacked[0]", "stacked[1]", "stacked[2]"]
  assert rows[0].shape == (36, 8) and rows[1].shape == (16, 24)
  want_alpha, want_xmin = ref_fit(
    np.linalg.svd(
      np.asarray(params["stacked"][1], np.float64), compute_uv=False
    )
    ** 2,
    "median",
  )
  # float32 SVD of a 16x8 Gaussian vs float64: ~1e-6 relative per eigenvalue.
  np.testing.assert_allclose(rows[3].alpha, want_alpha, rtol=1e-4)
  np.testing.assert_allclose(rows[3].xmin, want_xmin, rtol=1e-4)
  np.testing.assert_allclose(
    rows[1].spectral_norm,
    np.linalg.norm(np.asarray(params["dense"], np.float64), 2),
    rtol=1e-5,
  )
  table = diagnostics.format_alpha_table(rows)
  assert table.count("\n") == len(rows) + 1 and "stacked[2]" in table
  # Default: 2-D leaves only.
  assert [r.name for r in diagnostics.layer_alphas(params)] == ["dense"]


def test_plots(tmp_path):
  import matplotlib

  matplotlib.use("Agg")
  lam = spectrum_with_bulk(5, 2.5)
  ax = diagnostics.plot_esd(lam, xmin="ks", label="w")
  assert "alpha=" in ax.get_legend().get_texts()[-1].get_text()
  rows = diagnostics.layer_alphas(
    {
      "a": jnp.asarray(
        np.random.default_rng(0).normal(size=(20, 10)), jnp.float32
      )
    }
  )
  ax2 = diagnostics.plot_layer_alphas({"x": rows, "y": rows})
  ax2.figure.savefig(tmp_path / "alphas.png")
  assert (tmp_path / "alphas.png").stat().st_size > 0


def monitor_params():
  rng = np.random.default_rng(4)
  return {
    "dense": jnp.asarray(rng.normal(size=(24, 16)), jnp.float32),
    "bias": jnp.zeros(16),
    "stacked": jnp.asarray(rng.standard_t(3, size=(3, 16, 12)), jnp.float32),
  }


MONITOR_DIMS = {
  "dense": MuonDimensionNumbers(),
  "bias": None,
  "stacked": MuonDimensionNumbers(reduction_axis=1, output_axis=2),
}


@pytest.mark.parametrize("xmin", ["median", "ks"])
def test_alpha_monitor_matches_powerlaw_alpha(xmin):
  params = monitor_params()
  monitor = diagnostics.AlphaMonitor(MONITOR_DIMS, every=5, xmin=xmin)
  assert monitor(3, params) is None  # Not a due step: nothing computed.
  snap = monitor(10, params)
  assert snap.step == 10 and snap.xmin == xmin
  assert sorted(snap.alphas) == ["dense", "stacked"]
  assert len(snap.alphas["dense"]) == 1 and len(snap.alphas["stacked"]) == 3
  # The same weights through the eager, per-matrix path.
  for name, mats in (
    ("dense", [params["dense"]]),
    ("stacked", list(params["stacked"])),
  ):
    for got, w in zip(snap.alphas[name], mats):
      want, _ = diagnostics.powerlaw_alpha(diagnostics.esd(w), xmin=xmin)
      # Same float32 eigenvalues and formula, vmapped under jit vs eager:
      # only the summation order may differ (~1e-7 relative).
      np.testing.assert_allclose(got, float(want), rtol=1e-5)
  rows = diagnostics.layer_alphas(
    params, weight_dimension_numbers=MONITOR_DIMS, xmin=xmin
  )
  flat = [a for name in ("dense", "stacked") for a in snap.alphas[name]]
  np.testing.assert_allclose(flat, [r.alpha for r in rows], rtol=1e-5)
  np.testing.assert_allclose(snap.mean_alpha, np.mean(flat), rtol=1e-6)


def test_tree_alphas_runs_inside_jit_and_defaults():
  params = monitor_params()
  tree = jax.jit(
    lambda p: diagnostics.tree_alphas(p, weight_dimension_numbers=MONITOR_DIMS)
  )(params)
  assert tree["bias"] is None and tree["stacked"].shape == (3,)
  want = diagnostics.layer_alphas(
    params, weight_dimension_numbers=MONITOR_DIMS, xmin="median"
  )[0].alpha
  np.testing.assert_allclose(float(tree["dense"][0]), want, rtol=1e-5)
  # Default routing (2-D leaves), as in the optimizers; step 0 is due.
  snap = diagnostics.AlphaMonitor(every=100)(0, params)
  assert sorted(snap.alphas) == ["dense"] and snap.xmin == "median"


def test_alpha_monitor_bad_arguments():
  for every in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match="every"):
      diagnostics.AlphaMonitor(every=every)
  with pytest.raises(ValueError, match="xmin"):
    diagnostics.AlphaMonitor(xmin="mean")
