"""Tests for AdaMuon's pieces and `htadamuon` (HT-AdaMuon)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib._muon import orthogonalize_via_newton_schulz as optax_ns

import htmuon_jax
from tests.helpers import random_tree
from tests.reference import nesterov_ref, spectral_power_ref

# optax's Muon orthogonalization (the independent reference), jitted once.
orthogonalize_via_newton_schulz = jax.jit(optax_ns)


def htadamuon_ref(
  params,
  grads_seq,
  *,
  lr,
  power,
  beta=0.95,
  beta2=0.95,
  eps=1e-8,
  rms=0.2,
  wd=0.0,
  orthogonalize=None,
):
  """HT-AdaMuon (the `htadamuon` docstring's rule) in numpy float64.

  optax's bias-corrected Nesterov momentum N (the aliases'); O = U S^p V^T of
  sign(N) (or `orthogonalize(sign(N))`); V <- b2 V + (1-b2) O^2;
  O / (sqrt(V) + eps) scaled to rms * sqrt(m n) / ||.||_F;
  W <- W (1 - lr wd) - lr O.
  """
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  mom = {k: np.zeros_like(v) for k, v in w.items()}
  nu = {k: np.zeros_like(v) for k, v in w.items()}
  history = []
  for t, grads in enumerate(grads_seq, 1):
    for k in w:
      g = np.asarray(grads[k], np.float64)
      mom[k], n = nesterov_ref(mom[k], g, beta, t)
      sign = np.sign(n)
      o = (
        spectral_power_ref(sign, power)
        if orthogonalize is None
        else orthogonalize(sign)
      )
      nu[k] = beta2 * nu[k] + (1 - beta2) * o * o
      on = o / (np.sqrt(nu[k]) + eps)
      on *= rms * np.sqrt(on.size) / np.linalg.norm(on)
      w[k] = w[k] * (1 - lr * wd) - lr * on
    history.append({k: v.copy() for k, v in w.items()})
  return history


@pytest.mark.parametrize("power", [0.0, 0.125, 0.5])
def test_htadamuon_matches_numpy_rule_over_steps(power):
  rng = np.random.default_rng(0)
  shapes = {"tall": (9, 4), "wide": (4, 7)}
  params = random_tree(rng, shapes)
  grads_seq = [random_tree(rng, shapes) for _ in range(5)]
  opt = htmuon_jax.htadamuon(0.01, power, weight_decay=0.1, method="svd")
  p = jax.tree.map(jnp.asarray, params)
  state = opt.init(p)
  step = jax.jit(opt.update)
  refs = htadamuon_ref(params, grads_seq, lr=0.01, power=power, wd=0.1)
  for grads, ref in zip(grads_seq, refs):
    updates, state = step(jax.tree.map(jnp.asarray, grads), state, p)
    p = optax.apply_updates(p, updates)
    # fp32 SVD + elementwise normalization vs float64; updates are
    # lr * O(0.2 .. 1) entries, params O(1): a few fp32 ulps per step.
    chex.assert_trees_all_close(p, ref, atol=5e-6, rtol=0)


def test_power_zero_newton_schulz_is_adamuon():
  rng = np.random.default_rng(1)
  shapes = {"w": (8, 5)}
  params = random_tree(rng, shapes)
  grads_seq = [random_tree(rng, shapes) for _ in range(3)]

  def ns(x):  # optax's Muon orthogonalization: AdaMuon's own step
    return np.asarray(
      orthogonalize_via_newton_schulz(
        jnp.asarray(x, jnp.float32), jnp.asarray((3.4445, -4.7750, 2.0315))
      ),
      np.float64,
    )

  opt = htmuon_jax.htadamuon(0.01, 0.0, method="newton_schulz")
  p = jax.tree.map(jnp.asarray, params)
  state = opt.init(p)
  refs = htadamuon_ref(params, grads_seq, lr=0.01, power=0.0, orthogonalize=ns)
  step = jax.jit(opt.update)
  for grads, ref in zip(grads_seq, refs):
    updates, state = step(jax.tree.map(jnp.asarray, grads), state, p)
    p = optax.apply_updates(p, updates)
    chex.assert_trees_all_close(p, ref, atol=5e-6, rtol=0)  # as above


def test_update_rms_is_rms():
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.standard_normal((16, 6)), jnp.float32)}
  opt = htmuon_jax.htadamuon(1.0, rms=0.3, method="svd")
  up, _ = jax.jit(opt.update)(params, opt.init(params), params)
  rms = float(jnp.sqrt(jnp.mean(up["w"] ** 2)))
  assert rms == pytest.approx(0.3, rel=1e-5)  # fp32 norm


@pytest.mark.parametrize("method", ["svd", "stream"])
def test_distribute_changes_nothing_on_one_device(method):
  """`distribute` reaches the spectral step (grouping and padding included);
  the sign and AdaMuon's normalization stay on the params' layout."""
  rng = np.random.default_rng(4)
  params = {
    "w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32),
    "v": jnp.asarray(rng.standard_normal((6, 8)), jnp.float32),
    "b": jnp.zeros(6),
  }
  mesh = jax.make_mesh((1,), ("d",))
  runs = []
  for distribute in (None, mesh):
    opt = htmuon_jax.htadamuon(0.01, method=method, distribute=distribute)
    state, step = opt.init(params), jax.jit(opt.update)
    for _ in range(2):
      up, state = step(params, state, params)
    runs.append((up, state))
  # fp32, batched differently (SVD of a (2, 6, 8) group vs two (6, 8)):
  # ~10 ulps of the second moments (max ~0.05), 1 ulp of the updates.
  chex.assert_trees_all_close(runs[1], runs[0], atol=1e-7, rtol=0)


def test_scale_by_adamuon_state_layout():
  dims = {"k": htmuon_jax.MuonDimensionNumbers((0, 1, 2), 3), "b": None}
  tx = htmuon_jax.scale_by_adamuon(weight_dimension_numbers=dims)
  state = tx.init({"k": jnp.zeros((2, 2, 3, 4)), "b": jnp.zeros(4)})
  # The parameter's own layout (a conv kernel's shape, not (1, 12, 4)), so
  # that it shards like the parameter.
  chex.assert_shape(state.nu["k"], (2, 2, 3, 4))
  assert isinstance(state.nu["b"], optax.MaskedNode)


def test_inject_hyperparams_and_stream_method():
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)}
  opt = optax.inject_hyperparams(htmuon_jax.htadamuon)(
    learning_rate=0.01,
    power=0.25,
    beta2=0.9,
    method=htmuon_jax.methods.Stream(rank=2),
  )
  state = opt.init(params)
  step = jax.jit(opt.update)
  for _ in range(2):
    up, state = step(params, state, params)
  chex.assert_tree_all_finite(up)
  assert float(state.hyperparams["beta2"]) == pytest.approx(0.9)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"beta2": 1.5}, "beta2"),
    ({"adamuon_eps": -1.0}, "adamuon_eps"),
    ({"rms": -0.2}, "rms"),
    ({"power": 2.0}, "power"),
  ],
)
def test_bad_arguments_raise(kwargs, name):
  with pytest.raises(ValueError, match=name):
    htmuon_jax.htadamuon(0.01, **kwargs)


@pytest.mark.slow
def test_consistent_rms_interval_and_adaptive():
  rng = np.random.default_rng(5)
  params = {"w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)}
  g = {"w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)}

  def update(**kwargs):
    opt = htmuon_jax.htadamuon(0.01, method="svd", **kwargs)
    return jax.jit(opt.update)(g, opt.init(params), params)[0]["w"]

  base = update()
  # consistent_rms is the update RMS, as rms.
  chex.assert_trees_all_equal(update(consistent_rms=0.3), update(rms=0.3))
  # interval=1: the HT step on every update.
  chex.assert_trees_all_equal(update(interval=1), base)
  # adaptive: the final direction D = -base / lr scaled by <N, D>, N the
  # bias-corrected Nesterov momentum of the first step (see test_alias).
  n = 0.95 * 0.05 * g["w"] / (1 - 0.95**2) + 0.05 * g["w"] / 0.05
  d = -base / 0.01
  # fp32: one extra reduction and product.
  chex.assert_trees_all_close(
    update(adaptive=True), -0.01 * jnp.sum(n * d) * d, rtol=1e-5
  )
