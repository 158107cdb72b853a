"""Tests for NorMuon's normalization (`scale_by_normuon`) and `htnormuon`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib._muon import orthogonalize_via_newton_schulz as optax_ns

import htmuon_jax
from tests.helpers import random_tree
from tests.reference import nesterov_ref, rel_err, spectral_power_ref

# optax's Muon orthogonalization (the independent reference), jitted once.
orthogonalize_via_newton_schulz = jax.jit(optax_ns)


def htnormuon_ref(
  params, grads_seq, *, lr, power, beta=0.95, beta2=0.95, eps=1e-10, wd=0.0
):
  """HTNorMuon (README, "Optimizers") in numpy float64, 2-D (in, out) leaves.

  optax's bias-corrected Nesterov momentum (the aliases'), O = U S^p V^T
  (float64 SVD, s <= 1e-4 s_max -> 0), v <- b2 v + (1-b2) mean over fan_in
  (axis 0) of O^2, O / (sqrt(v) + eps), rescaled to ||O||_F, times
  sqrt(max(1, fan_out / fan_in)); W <- W (1 - lr wd) - lr O.
  """
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  mom = {k: np.zeros_like(v) for k, v in w.items()}
  nu = {k: np.zeros(v.shape[1]) for k, v in w.items()}
  history = []
  for t, grads in enumerate(grads_seq, 1):
    for k in w:
      g = np.asarray(grads[k], np.float64)
      mom[k], n = nesterov_ref(mom[k], g, beta, t)
      o = spectral_power_ref(n, power)
      nu[k] = beta2 * nu[k] + (1 - beta2) * np.mean(o * o, axis=0)
      on = o / (np.sqrt(nu[k]) + eps)
      on *= np.linalg.norm(o) / np.linalg.norm(on)
      fan_in, fan_out = o.shape
      w[k] = w[k] * (1 - lr * wd) - lr * max(1.0, fan_out / fan_in) ** 0.5 * on
    history.append({k: v.copy() for k, v in w.items()})
  return history


@pytest.mark.parametrize("power", [0.0, 0.125])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_htnormuon_matches_numpy_rule_over_steps(power, wd):
  rng = np.random.default_rng(0)
  shapes = {"tall": (8, 3), "wide": (3, 7)}
  params = random_tree(rng, shapes)
  grads_seq = [random_tree(rng, shapes) for _ in range(5)]
  opt = htmuon_jax.htnormuon(0.03, power, weight_decay=wd, method="svd")
  p = jax.tree.map(jnp.asarray, params)
  state = opt.init(p)
  step = jax.jit(opt.update)
  refs = htnormuon_ref(params, grads_seq, lr=0.03, power=power, wd=wd)
  for grads, ref in zip(grads_seq, refs):
    updates, state = step(jax.tree.map(jnp.asarray, grads), state, p)
    p = optax.apply_updates(p, updates)
    # fp32 SVD and normalization vs float64: ~1e-6 relative per step on
    # updates of size lr * O(1); params are O(1).
    chex.assert_trees_all_close(p, ref, atol=5e-6, rtol=0)


def test_power_zero_newton_schulz_is_normuon():
  # NorMuon = optax's Muon orthogonalization followed by the normalization;
  # optax.contrib.muon's Newton-Schulz is the independent reference here.
  rng = np.random.default_rng(1)
  g = rng.standard_normal((6, 4)).astype(np.float32)
  opt = htmuon_jax.htnormuon(1.0, 0.0, method="newton_schulz")
  params = {"w": jnp.asarray(g)}
  up, _ = opt.update(params, opt.init(params), params)
  # optax's Nesterov of the first step: 0.95 * 0.05 g / (1 - 0.95^2) + g.
  n = (0.95 * 0.05 / (1 - 0.95**2) + 1.0) * g
  o = np.asarray(
    orthogonalize_via_newton_schulz(
      jnp.asarray(n), jnp.asarray((3.4445, -4.7750, 2.0315))
    )
  )
  o64 = o.astype(np.float64)
  nu = 0.05 * np.mean(o64**2, axis=0)
  on = o64 / (np.sqrt(nu) + 1e-10)
  on *= np.linalg.norm(o64) / np.linalg.norm(on)
  assert rel_err(-np.asarray(up["w"]), on) < 1e-5  # fp32 normalization


def test_scale_by_normuon_units_follow_the_reduction_axes():
  rng = np.random.default_rng(2)
  kernel = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
  dims = {"k": htmuon_jax.MuonDimensionNumbers((0, 1, 2), 3), "b": None}
  tx = htmuon_jax.scale_by_normuon(0.5, 0.0, weight_dimension_numbers=dims)
  state = tx.init({"k": kernel, "b": np.ones(4, np.float32)})
  assert isinstance(state.nu["b"], optax.MaskedNode)
  chex.assert_shape(state.nu["k"], (1, 4))
  out, state = tx.update({"k": kernel, "b": np.ones(4, np.float32)}, state)
  flat = kernel.reshape(12, 4).astype(np.float64)
  nu = 0.5 * np.mean(flat**2, axis=0)
  ref = flat / np.sqrt(nu)
  ref *= np.linalg.norm(flat) / np.linalg.norm(ref)
  assert rel_err(out["k"], ref.reshape(kernel.shape)) < 1e-6  # fp32
  chex.assert_trees_all_close(state.nu["k"][0], nu, rtol=1e-6)
  chex.assert_trees_all_equal(out["b"], np.ones(4, np.float32))


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"beta2": 1.0}, "beta2"),
    ({"normuon_eps": -1.0}, "normuon_eps"),
    ({"power": -0.5}, "power"),
  ],
)
def test_bad_arguments_raise(kwargs, name):
  with pytest.raises(ValueError, match=name):
    htmuon_jax.htnormuon(0.03, **kwargs)
