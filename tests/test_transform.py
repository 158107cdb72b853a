"""The composable transformations: spectral power, shape scaling, momentum."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers as DN

import htmuon_jax
from tests.reference import rel_err, spectral_power_ref


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {
    "dense": {"kernel": f(6, 10), "bias": f(10)},
    "layers": [f(10, 4), (f(4, 4), f(4))],
    "scale": f(3),
  }


@pytest.mark.parametrize("method", ["svd", "eigh"])
def test_spectral_power_on_any_pytree(method):
  tree = _tree()
  tx = htmuon_jax.scale_by_spectral_power(0.125, method=method)
  out, _ = tx.update(tree, tx.init(tree))
  chex.assert_trees_all_equal_structs(out, tree)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    got = dict(jax.tree_util.tree_leaves_with_path(out))[path]
    if leaf.ndim == 2:
      assert rel_err(got, spectral_power_ref(leaf, 0.125)) < 1e-4
    else:  # not a matrix: passes through unchanged
      chex.assert_trees_all_equal(got, leaf)


def test_conv_kernel_via_dimension_numbers():
  rng = np.random.default_rng(1)
  kernel = rng.standard_normal((3, 3, 4, 8)).astype(np.float32)
  spec = DN(reduction_axis=(0, 1, 2), output_axis=3)
  tx = htmuon_jax.scale_by_spectral_power(
    0.25, method="svd", weight_dimension_numbers={"conv": spec}
  )
  out, _ = tx.update({"conv": jnp.asarray(kernel)}, optax.EmptyState())
  ref = spectral_power_ref(kernel.reshape(36, 8), 0.25).reshape(3, 3, 4, 8)
  assert rel_err(out["conv"], ref) < 1e-5


def test_stacked_layers_are_independent_matrices():
  rng = np.random.default_rng(2)
  stack = rng.standard_normal((4, 6, 5)).astype(np.float32)
  norm = rng.standard_normal((4, 5)).astype(np.float32)
  dims = {"kernel": DN(1, 2), "norm": None}
  tx = htmuon_jax.scale_by_spectral_power(
    0.125, method="svd", weight_dimension_numbers=dims
  )
  out, _ = tx.update(
    {"kernel": jnp.asarray(stack), "norm": jnp.asarray(norm)},
    optax.EmptyState(),
  )
  for i in range(4):
    assert rel_err(out["kernel"][i], spectral_power_ref(stack[i], 0.125)) < 1e-5
  chex.assert_trees_all_equal(out["norm"], jnp.asarray(norm))


def test_spectral_power_rejects_non_matrix_leaf():
  tx = htmuon_jax.scale_by_spectral_power(
    0.125, weight_dimension_numbers={"b": DN()}
  )
  with pytest.raises(ValueError, match="needs a matrix"):
    tx.update({"b": jnp.ones(3)}, optax.EmptyState())


@pytest.mark.parametrize(
  "shape, spec, rms, factor",
  [
    ((4, 16), None, None, 2.0),  # fan_out / fan_in = 4
    ((16, 4), None, None, 1.0),
    ((4, 16), None, 0.2, 0.2 * 4.0),
    ((3, 3, 4, 8), DN((0, 1, 2), 3), None, 1.0),
    ((3, 3, 2, 72), DN((0, 1, 2), 3), None, 2.0),  # 18 in, 72 out
    ((5, 2, 8), DN(1, 2), None, 2.0),
  ],
)
def test_scale_by_shape(shape, spec, rms, factor):
  x = jnp.ones(shape)
  tx = htmuon_jax.scale_by_shape(
    weight_dimension_numbers=None if spec is None else {"w": spec},
    consistent_rms=rms,
  )
  out, _ = tx.update({"w": x}, tx.init({"w": x}))
  chex.assert_trees_all_close(out["w"], factor * x, rtol=1e-6)


def test_scale_by_shape_leaves_vectors_alone():
  tx = htmuon_jax.scale_by_shape()
  out, _ = tx.update({"b": jnp.ones(7)}, optax.EmptyState())
  chex.assert_trees_all_equal(out["b"], jnp.ones(7))


def _momentum_ref(grads, beta, nesterov, bias_correction):
  """Numpy EMA momentum; optax's bias correction when requested."""
  m = np.zeros_like(grads[0], dtype=np.float64)
  out = []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    m = beta * m + (1 - beta) * g
    if bias_correction:
      if nesterov:
        n = beta * m / (1 - beta ** (t + 1)) + (1 - beta) * g / (1 - beta**t)
      else:
        n = m / (1 - beta**t)
    else:
      n = beta * m + (1 - beta) * g if nesterov else m
    out.append(n)
  return out


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("bias_correction", [True, False])
def test_scale_by_htmuon_matches_numpy(nesterov, bias_correction):
  rng = np.random.default_rng(3)
  grads = [rng.standard_normal((5, 7)).astype(np.float32) for _ in range(4)]
  tx = htmuon_jax.scale_by_htmuon(
    0.125, 0.9, nesterov=nesterov, bias_correction=bias_correction, method="svd"
  )
  state = tx.init({"w": jnp.zeros((5, 7))})
  assert isinstance(state, htmuon_jax.ScaleByHTMuonState)
  refs = _momentum_ref(grads, 0.9, nesterov, bias_correction)
  for g, n in zip(grads, refs):
    out, state = tx.update({"w": jnp.asarray(g)}, state)
    assert rel_err(out["w"], spectral_power_ref(n, 0.125)) < 1e-5
  assert int(state.count) == 4


def test_scale_by_htmuon_mu_dtype():
  tx = htmuon_jax.scale_by_htmuon(mu_dtype=jnp.bfloat16, method="svd")
  params = {"w": jnp.ones((4, 4))}
  state = tx.init(params)
  chex.assert_type(state.mu["w"], jnp.bfloat16)
  _, state = tx.update(params, state)
  chex.assert_type(state.mu["w"], jnp.bfloat16)


@pytest.mark.parametrize("beta", [-0.1, 1.0, 1.5])
def test_invalid_beta(beta):
  with pytest.raises(ValueError, match="beta"):
    htmuon_jax.scale_by_htmuon(beta=beta)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(power=2.0), "power"),
    (dict(method="nope"), "method"),
    (dict(power=0.5, method="newton_schulz"), "newton_schulz"),
    (dict(eps=1.0), "eps"),
  ],
)
def test_invalid_spectral_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    htmuon_jax.scale_by_spectral_power(**kwargs)
  with pytest.raises(ValueError, match=name):
    htmuon_jax.scale_by_htmuon(**kwargs)
