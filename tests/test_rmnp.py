"""Tests for RMNP: `scale_by_row_norm` and the `rmnp` alias."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import htmuon_jax
from tests.helpers import random_tree
from htmuon_jax import _row_norm as row_norm


def rmnp_ref(
  params, grads_seq, *, lr, beta=0.95, eps=1e-8, wd=0.0, nesterov=True
):
  """RMNP's rule (README, "Optimizers") in numpy float64, 2-D (in, out) leaves.

  B <- beta B + G; N = G + beta B (or B); each output unit (column of a Flax
  kernel) divided by its norm over fan_in plus eps; times
  sqrt(max(1, fan_out / fan_in)); W <- W (1 - lr wd) - lr N.
  """
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in w.items()}
  history = []
  for grads in grads_seq:
    for k in w:
      g = np.asarray(grads[k], np.float64)
      buf[k] = beta * buf[k] + g
      n = g + beta * buf[k] if nesterov else buf[k]
      n = n / (np.linalg.norm(n, axis=0, keepdims=True) + eps)
      fan_in, fan_out = n.shape
      n = n * max(1.0, fan_out / fan_in) ** 0.5
      w[k] = w[k] * (1 - lr * wd) - lr * n
    history.append({k: v.copy() for k, v in w.items()})
  return history


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_rmnp_matches_numpy_rule_over_steps(nesterov, wd):
  rng = np.random.default_rng(0)
  shapes = {"tall": (7, 3), "wide": (3, 8)}
  params = random_tree(rng, shapes)
  grads_seq = [random_tree(rng, shapes) for _ in range(5)]
  opt = htmuon_jax.rmnp(0.02, weight_decay=wd, nesterov=nesterov)
  p = jax.tree.map(jnp.asarray, params)
  state = opt.init(p)
  step = jax.jit(opt.update)
  refs = rmnp_ref(params, grads_seq, lr=0.02, wd=wd, nesterov=nesterov)
  for grads, ref in zip(grads_seq, refs):
    updates, state = step(jax.tree.map(jnp.asarray, grads), state, p)
    p = optax.apply_updates(p, updates)
    # fp32 vs float64: a few ulps of |W| ~ 1 per step.
    chex.assert_trees_all_close(p, ref, atol=2e-6, rtol=0)


def test_non_matrix_leaves_get_adamw():
  rng = np.random.default_rng(1)
  params = {
    "w": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32),
    "b": jnp.zeros(5),
  }
  opt = htmuon_jax.rmnp(0.02, adam_learning_rate=1e-3)
  adamw = optax.adamw(1e-3, eps=1e-8, nesterov=True)
  state, a_state = opt.init(params), adamw.init({"b": params["b"]})
  step = jax.jit(opt.update)
  for _ in range(3):
    g = jnp.asarray(rng.standard_normal(5), jnp.float32)
    up, state = step({"w": params["w"], "b": g}, state, params)
    a_up, a_state = adamw.update({"b": g}, a_state, {"b": params["b"]})
    chex.assert_trees_all_close(up["b"], a_up["b"], atol=1e-7)


def test_row_norm_over_fan_in_and_reduction_axes():
  rng = np.random.default_rng(2)
  kernel = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
  dense = rng.standard_normal((6, 5)).astype(np.float32)
  dims = {
    "conv": htmuon_jax.MuonDimensionNumbers((0, 1, 2), 3),
    "dense": htmuon_jax.MuonDimensionNumbers(),
    "bias": None,
  }
  tx = htmuon_jax.scale_by_row_norm(0.0, weight_dimension_numbers=dims)
  out, _ = tx.update(
    {"conv": kernel, "dense": dense, "bias": np.ones(3)}, optax.EmptyState()
  )
  ref_conv = kernel / np.linalg.norm(kernel.reshape(12, 4), axis=0)
  ref_dense = dense / np.linalg.norm(dense, axis=0, keepdims=True)
  chex.assert_trees_all_close(out["conv"], ref_conv, atol=1e-6)  # fp32
  chex.assert_trees_all_close(out["dense"], ref_dense, atol=1e-6)
  chex.assert_trees_all_equal(out["bias"], np.ones(3))


def test_inject_hyperparams_schedule_and_mask():
  rng = np.random.default_rng(3)
  params = {
    "w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
    "v": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
  }
  sched = optax.linear_schedule(0.02, 0.0, 4)
  opt = optax.inject_hyperparams(htmuon_jax.rmnp)(
    learning_rate=sched,
    weight_decay=0.5,
    weight_decay_mask={"w": True, "v": False},
  )
  state = opt.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  up, state = jax.jit(opt.update)(zeros, state, params)
  # Zero gradient: only the masked-in leaf decays, by lr * wd * W.
  chex.assert_trees_all_close(up["w"], -0.02 * 0.5 * params["w"], atol=1e-7)
  chex.assert_trees_all_equal(up["v"], jnp.zeros((4, 3)))
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.02)


def test_defaults_are_the_papers():
  opt = optax.inject_hyperparams(htmuon_jax.rmnp)()
  hp = opt.init({"w": jnp.zeros((2, 2))}).hyperparams
  assert float(hp["learning_rate"]) == pytest.approx(0.02)
  assert float(hp["beta"]) == pytest.approx(0.95)


@pytest.mark.parametrize(
  "factory, kwargs, name",
  [
    (htmuon_jax.rmnp, {"beta": 1.0}, "beta"),
    (row_norm.scale_by_row_norm, {"eps": -1.0}, "eps"),
  ],
)
def test_bad_arguments_raise(factory, kwargs, name):
  with pytest.raises(ValueError, match=name):
    factory(**kwargs)
