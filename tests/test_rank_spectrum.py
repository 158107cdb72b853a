"""Tests for `spectrum="rank"`: the authors' `U diag(i**-p) V^T`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import htmuon_jax
from tests.reference import matrix_with_spectrum, rel_err


def rank_ref(x, power, eps=1e-4):
  """`U diag(i**-p) V^T` in numpy float64, i = 1 for the largest singular
  value; singular values s <= eps * s_max count as zero (map to 0)."""
  x = np.asarray(x, np.float64)
  u, s, vh = np.linalg.svd(x, full_matrices=False)  # s descending
  i = np.arange(1, s.shape[-1] + 1, dtype=np.float64)
  f = np.where(s > eps * s.max(axis=-1, keepdims=True), i**-power, 0.0)
  return (u * f[..., None, :]) @ vh


@pytest.mark.parametrize(
  "method, shape",
  [
    ("svd", (9, 5)),
    ("svd", (5, 9)),
    ("svd", (2, 6, 6)),
    ("eigh", (9, 5)),
    ("eigh", (5, 9)),
    ("eigh", (2, 6, 6)),
    ("auto", (9, 5)),
  ],
)
@pytest.mark.parametrize("power", [0.0, 0.125, 1.0])
def test_spectral_power_rank_matches_numpy(method, shape, power):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32)
  out = htmuon_jax.spectral_power(x, power, method=method, spectrum="rank")
  chex.assert_shape(out, shape)
  # fp32 singular vectors of Gaussian matrices (gaps ~0.1 s_max); eigh's
  # Gram route squares the conditioning of the smallest direction.
  tol = 2e-6 if method != "eigh" else 2e-4
  assert rel_err(out, rank_ref(x, power)) < tol


def test_rank_deficient_and_scale_free():
  rng = np.random.default_rng(1)
  x = matrix_with_spectrum(rng, 8, 6, [5.0, 2.0, 1.0, 0, 0, 0])
  for scale in (1.0, 1e3):
    out = htmuon_jax.spectral_power(
      (scale * x).astype(np.float32), 0.5, method="svd", spectrum="rank"
    )
    # i**-p ignores sizes: the same answer at any scale; noise directions
    # (fp32 ~1e-7 s_max) are cut by the 1e-4 rule, not ranked 4, 5, 6.
    assert rel_err(out, rank_ref(x, 0.5)) < 2e-6


@pytest.mark.parametrize("method", ["svd", "eigh", "stream"])
def test_scale_by_htmuon_rank_over_steps(method):
  rng = np.random.default_rng(2)
  # A well-separated matrix plus noise; the streaming iteration lags a
  # changing matrix by one step, so it gets a fixed gradient (its momentum
  # keeps one direction) and is checked once its basis has converged.
  base = matrix_with_spectrum(rng, 7, 4, [4.0, 2.0, 1.0, 0.5])
  drift = 0.0 if method == "stream" else 0.01
  gs = [
    (base + drift * rng.standard_normal((7, 4))).astype(np.float32)
    for _ in range(40)
  ]
  tx = htmuon_jax.scale_by_htmuon(
    0.25, method=method, spectrum="rank", bias_correction=False
  )
  state = tx.init({"w": gs[0]})
  step = jax.jit(tx.update)
  m = np.zeros((7, 4))
  for t, g in enumerate(gs):
    out, state = step({"w": jnp.asarray(g)}, state)
    m = 0.95 * m + 0.05 * g
    ref = rank_ref(0.95 * m + 0.05 * g, 0.25)
    if method != "stream" or t >= 20:
      # fp32; eigh squares the conditioning (s ratio 8 -> 64): ~1e-6;
      # the streaming basis has converged by step 20 (ratios <= 0.25/step).
      assert rel_err(out["w"], ref) < 1e-5


@pytest.mark.parametrize("method", ["newton_schulz", "polynomial", "express"])
def test_methods_without_singular_values_raise(method):
  power = 0.0 if method == "newton_schulz" else 0.125
  with pytest.raises(ValueError, match="spectrum"):
    htmuon_jax.spectral_power(
      jnp.ones((3, 3)), power, method=method, spectrum="rank"
    )
  with pytest.raises(ValueError, match="spectrum"):
    htmuon_jax.htmuon(0.1, power, method=method, spectrum="rank")


def test_unknown_spectrum_raises():
  with pytest.raises(ValueError, match="spectrum"):
    htmuon_jax.scale_by_spectral_power(0.125, spectrum="log")
