"""Non-finite inputs that hung: run in a subprocess under a timeout.

Not collected by the main suite (the name does not start with `test_`):
`tests/test_reliability.py` runs this file with a timeout, so a regression
fails instead of stalling CI. LAPACK's SVD never returned on a 16 x 16
(also 3 x 3, 5 x 4, 8 x 16) matrix with one Inf; `spectral_power` hung the
same way for svd, eigh, polynomial and auto, and `optax.apply_if_finite`
ran the update (and hung) on its third Inf step with
`max_consecutive_errors=2`, or always under `jax.vmap`.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import htmuon_jax
from htmuon_jax import diagnostics
from htmuon_jax.methods import _stream as streaming

SHAPES = [(3, 3), (5, 4), (8, 16), (16, 16), (32, 64)]
METHODS = ["svd", "eigh", "polynomial", "auto", "newton_schulz", "express"]
BAD = [np.inf, np.nan]
# Every alias, and each stateless method through htmuon.
CONFIGS = [
  ("htmuon", {}),
  ("htmuon", {"method": "eigh"}),
  ("htmuon", {"method": "polynomial"}),
  ("htmuon", {"method": "stream"}),
  ("htmuon", {"interval": 2}),
  ("muon", {}),
  ("htnormuon", {}),
  ("htadamuon", {}),
  ("rmnp", {}),
]
IDS = ["-".join([n, *map(str, k.values())]) for n, k in CONFIGS]


def _batch(shape, seed=0):
  return jnp.asarray(
    np.random.default_rng(seed).standard_normal((2, *shape)), jnp.float32
  )


@pytest.mark.parametrize("method", METHODS)
def test_spectral_power_of_a_non_finite_matrix_is_nan(method):
  power = 0.0 if method == "newton_schulz" else 0.125
  fn = jax.jit(
    functools.partial(htmuon_jax.spectral_power, power=power, method=method)
  )
  for i, shape in enumerate(SHAPES):
    x = _batch(shape)
    out = fn(x.at[0, 0, 0].set(BAD[i % len(BAD)]))
    assert bool(jnp.all(jnp.isnan(out[0]))), (shape, out[0])
    # The other matrix of the batch is unaffected (same compiled program).
    chex.assert_trees_all_equal(out[1], fn(x)[1])


@pytest.mark.parametrize("qr", ["qr", "cholesky"])
def test_stream_step_of_a_non_finite_matrix_is_nan_and_keeps_its_basis(qr):
  for shape in SHAPES:
    x = _batch(shape).at[0, -1, 0].set(np.inf)
    basis = streaming.init_basis(x.shape, 2)
    out, new_basis = jax.jit(
      functools.partial(streaming.stream_spectral_power, power=0.125, qr=qr)
    )(x, basis)
    assert bool(jnp.all(jnp.isnan(out[0])))
    chex.assert_tree_all_finite(out[1])
    chex.assert_trees_all_equal(new_basis[0], basis[0])


def test_esd_of_a_non_finite_matrix_is_nan():
  for shape in SHAPES:
    x = _batch(shape).at[1, 0, 0].set(np.inf)
    ev = jax.jit(diagnostics.esd)(x)
    assert bool(jnp.all(jnp.isnan(ev[1])))
    chex.assert_tree_all_finite(ev[0])


def _params():
  rng = np.random.default_rng(1)
  p = {
    f"w{i}": jnp.asarray(rng.standard_normal(s), jnp.float32)
    for i, s in enumerate(SHAPES)
  }
  p["bias"] = jnp.zeros(4)
  return p


def _grads(params, bad=None, leaf="w3"):
  g = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  if bad is not None:
    g[leaf] = g[leaf].at[0, 0].set(bad)
  return g


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=IDS)
def test_alias_update_of_a_non_finite_matrix_is_non_finite(name, kwargs):
  params = _params()
  opt = getattr(htmuon_jax, name)(0.01, **kwargs)
  update = jax.jit(opt.update)
  for leaf in [k for k in params if k != "bias"]:
    updates, _ = update(_grads(params, np.inf, leaf), opt.init(params), params)
    # Row-normalized methods (rmnp) poison the affected unit only.
    assert not bool(jnp.all(jnp.isfinite(updates[leaf]))), (leaf, updates)
    for k in params:
      if k != leaf:
        chex.assert_tree_all_finite(updates[k])


@pytest.mark.parametrize(
  "name, kwargs",
  [CONFIGS[i] for i in (0, 3, 5, 7)],
  ids=[IDS[i] for i in (0, 3, 5, 7)],
)
def test_apply_if_finite_past_max_consecutive_errors(name, kwargs):
  """Three Inf steps with `max_consecutive_errors=2`: the third runs the
  update on the Inf (it hung); its result is non-finite."""
  params = _params()
  opt = optax.apply_if_finite(
    getattr(htmuon_jax, name)(0.01, **kwargs), max_consecutive_errors=2
  )
  state = opt.init(params)
  update = jax.jit(opt.update)
  updates, state = update(_grads(params), state, params)
  for step in range(3):
    updates, state = update(_grads(params, np.inf), state, params)
    if step < 2:
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
  assert not bool(jnp.all(jnp.isfinite(updates["w3"])))


@pytest.mark.parametrize(
  "name, kwargs", [CONFIGS[0], CONFIGS[3]], ids=[IDS[0], IDS[3]]
)
def test_apply_if_finite_under_vmap(name, kwargs):
  """Under `jax.vmap` the guard's `lax.cond` runs both branches, so the
  update runs on the Inf too: it must return, and the finite member of the
  batch must match its unbatched step."""
  params = _params()
  opt = optax.apply_if_finite(
    getattr(htmuon_jax, name)(0.01, **kwargs), max_consecutive_errors=2
  )
  state = opt.init(params)
  grads = jax.tree.map(
    lambda a, b: jnp.stack([a, b]), _grads(params), _grads(params, np.inf)
  )
  states = jax.tree.map(lambda s: jnp.stack([s, s]), state)
  updates, new_states = jax.jit(jax.vmap(opt.update, in_axes=(0, 0, None)))(
    grads, states, params
  )
  want, _ = jax.jit(opt.update)(_grads(params), state, params)
  chex.assert_trees_all_close(
    jax.tree.map(lambda u: u[0], updates), want, rtol=1e-5, atol=1e-7
  )
  chex.assert_trees_all_equal(
    jax.tree.map(lambda u: u[1], updates), jax.tree.map(jnp.zeros_like, params)
  )
  assert int(new_states.notfinite_count[1]) == 1
