"""The optax contract, for every alias and several methods.

In the style of optax's `contrib/_common_test.py`: a table of optimizers
(every entry of `htmuon_jax.ALIASES`, with its defaults, plus `htmuon` with
each spectral method) times the behaviours every optax optimizer should
have. A new alias is covered by adding it to `htmuon_jax.ALIASES`.
"""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import htmuon_jax

# (alias name, keyword arguments): every alias with its defaults, then
# htmuon / muon with each method and mode.
# (`"polynomial"` compiles slowly; test_polynomial covers it.)
CASES = [(name, {}) for name in htmuon_jax.ALIASES] + [
  ("htmuon", {"method": "eigh"}),
  ("htmuon", {"method": "stream"}),
  ("htmuon", {"method": "svd", "interval": 2}),
]
IDS = [
  name + "".join(f"-{v}" for v in kwargs.values()) for name, kwargs in CASES
]
LR = 0.05


def _factory(name):
  return htmuon_jax.ALIASES[name]


def _static_args(name, kwargs):
  """Arguments `optax.inject_hyperparams` must not trace (for now)."""
  params = inspect.signature(_factory(name)).parameters
  static = {"ns_steps", "rank"} & set(params)
  if kwargs.get("method") == "polynomial":  # selects its coefficients
    static |= {"power", "spectral_eps"}  # (no such case in the table now)
  return tuple(sorted(static))


def _make(name, kwargs, learning_rate=LR):
  return _factory(name)(learning_rate, **kwargs)


def _tree(seed, dtype=jnp.float32):
  """A matrix, a wide matrix, a stacked kernel and a bias."""
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  return {
    "w": f(6, 4),
    "wide": f(3, 7),
    "layers": {"kernel": f(2, 5, 3), "bias": f(2, 3)},
    "b": f(4),
  }


def test_every_alias_is_in_the_table():
  exported = {
    n
    for n in htmuon_jax.__all__
    if callable(getattr(htmuon_jax, n))
    and not isinstance(getattr(htmuon_jax, n), type)
    and list(inspect.signature(getattr(htmuon_jax, n)).parameters)[:1]
    == ["learning_rate"]
  }
  assert exported == set(htmuon_jax.ALIASES)


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_jit_once_and_dtype_preserved(name, kwargs):
  """Three steps, one trace; bfloat16 params stay bfloat16."""
  params = _tree(0, jnp.bfloat16)
  opt = _make(name, kwargs)
  traces = []

  @jax.jit
  def step(params, state, g):
    traces.append(None)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for seed in range(1, 4):
    params, state = step(params, state, _tree(seed, jnp.bfloat16))
  assert len(traces) == 1
  chex.assert_trees_all_equal_dtypes(params, _tree(0, jnp.bfloat16))
  chex.assert_tree_all_finite((params, state))


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_inject_hyperparams(name, kwargs):
  params, grads = _tree(0), _tree(1)
  opt = _make(name, kwargs)
  injected = optax.inject_hyperparams(
    _factory(name), static_args=_static_args(name, kwargs)
  )(learning_rate=LR, **kwargs)
  state, state_inj = opt.init(params), injected.init(params)
  updates, state = jax.jit(opt.update)(grads, state, params)
  step = jax.jit(injected.update)
  updates_inj, state_inj = step(grads, state_inj, params)
  # Same computation, hyperparameters as traced float32 scalars instead of
  # Python floats: equal to fp32 round-off.
  chex.assert_trees_all_close(updates_inj, updates, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(
    state_inj.inner_state, state, rtol=1e-5, atol=1e-7
  )
  # A new learning rate takes effect without recompiling.
  lr = state_inj.hyperparams["learning_rate"]
  hyper = dict(
    state_inj.hyperparams, learning_rate=jnp.asarray(2 * LR, lr.dtype)
  )
  updates_2, _ = step(grads, state_inj._replace(hyperparams=hyper), params)
  assert step._cache_size() == 1
  chex.assert_tree_all_finite(updates_2)


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_multi_steps_accumulates_the_mean_gradient(name, kwargs):
  params, g1, g2 = _tree(0), _tree(1), _tree(2)
  opt = _make(name, kwargs)
  multi = optax.MultiSteps(opt, every_k_schedule=2)
  step = jax.jit(multi.update)
  state = multi.init(params)
  skipped, state = step(g1, state, params)
  chex.assert_trees_all_equal(skipped, jax.tree.map(jnp.zeros_like, params))
  accumulated, _ = step(g2, state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  expected, _ = jax.jit(opt.update)(mean, opt.init(params), params)
  # MultiSteps averages in fp32 in another order than (a + b) / 2: the mean
  # differs by round-off, and the spectral step is Lipschitz in it.
  chex.assert_trees_all_close(accumulated, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_tree_map_params(name, kwargs):
  params = _tree(0)
  opt = _make(name, kwargs)
  state = opt.init(params)
  # A no-op map over the parameter-shaped leaves keeps the state.
  same = optax.tree_map_params(opt, lambda v: v, state)
  chex.assert_trees_all_equal(same, state)
  # Casting them changes exactly the leaves shaped like a parameter.
  cast = optax.tree_map_params(
    opt,
    lambda v: v.astype(jnp.bfloat16),
    state,
    transform_non_params=lambda v: v,
  )
  assert jax.tree.structure(cast) == jax.tree.structure(state)
  assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(cast))


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_zero_gradients_give_zero_updates_with_extra_args(name, kwargs):
  params = _tree(0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  opt = _make(name, kwargs)
  # Extra keyword arguments (e.g. a loss for a wrapper) pass through.
  step = jax.jit(lambda g, s, p: opt.update(g, s, p, loss=jnp.asarray(1.0)))
  state = opt.init(params)
  for _ in range(2):
    updates, state = step(zeros, state, params)
    chex.assert_trees_all_equal(updates, zeros)
  chex.assert_tree_all_finite(state)


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_converges_on_matrix_least_squares(name, kwargs):
  """`min ||X W + b - Y||^2` for a matrix `W` and a bias `b`."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((32, 6)), jnp.float32)
  target = {
    "w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
    "b": jnp.asarray(rng.standard_normal(4), jnp.float32),
  }
  y = x @ target["w"] + target["b"]
  loss = lambda p: jnp.mean(jnp.square(x @ p["w"] + p["b"] - y))
  steps = 150
  opt = _make(name, kwargs, optax.cosine_decay_schedule(0.1, steps))

  @jax.jit
  def run(params):
    def body(carry, _):
      params, state = carry
      updates, state = opt.update(jax.grad(loss)(params), state, params)
      return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(
      body, (params, opt.init(params)), None, length=steps
    )
    return params

  start = jax.tree.map(jnp.zeros_like, target)
  final = run(start)
  # Normalized steps of size ~lr (0.2 lr for htadamuon's RMS) reach the
  # optimum up to the decayed step size; a wrong direction does not remove
  # 95% of the loss.
  assert float(loss(final)) < 0.05 * float(loss(start))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_state_shape_and_dtype_are_stable(name, kwargs, dtype):
  """optax's contract: `update` returns a state of `init`'s tree, shapes and
  dtypes (a training loop under `jit`/`scan` carries it unchanged)."""
  params = _tree(0, dtype)
  opt = _make(name, kwargs)
  state = jax.eval_shape(opt.init, params)
  new_state = jax.eval_shape(
    lambda g, s, p: opt.update(g, s, p)[1], params, state, params
  )
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
