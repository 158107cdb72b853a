"""Reliability: edge-case matrices, non-finite gradients, determinism, long runs.

Every method and every alias the package exports is covered; methods and
aliases are discovered from the package so new ones are tested automatically.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import htmuon_jax
from htmuon_jax import spectral
from tests.reference import matrix_with_spectrum, rel_err, spectral_power_ref

# Documented accuracy on well-conditioned inputs (see htmuon_jax.spectral).
EXACT_TOL = {"svd": 1e-5, "eigh": 1e-4}
if "polynomial" in spectral.METHODS:
  EXACT_TOL["polynomial"] = 1e-3
EXACT_METHODS = sorted(EXACT_TOL)
# Rank-deficient inputs in fp32 carry noise singular values ~1e-7 s_max, far
# below the cutoff: svd/eigh cut them exactly, the polynomial method fades
# them towards 0 instead (documented: ~4e-3 against the hard-cut reference).
RANK_DEFICIENT_TOL = dict(EXACT_TOL, polynomial=5e-3)
RANK_DEFICIENT_CASES = ("rank1",)
ALL_METHODS = EXACT_METHODS + ["newton_schulz"]


def _edge_cases():
  rng = np.random.default_rng(0)
  u, v = rng.standard_normal(7), rng.standard_normal(5)
  q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  return {
      "rank1": np.outer(u, v),
      "row": rng.standard_normal((1, 9)),
      "column": rng.standard_normal((9, 1)),
      "row_8192": rng.standard_normal((1, 8192)),
      "identity": np.eye(5),
      "scaled_orthogonal": 3.0 * q,
      "repeated": matrix_with_spectrum(rng, 8, 6, [2, 2, 2, 1, 1, 0.5]),
      "tiny": 1e-30 * rng.standard_normal((4, 6)),
      "huge": 1e30 * rng.standard_normal((6, 4)),
  }


EDGE = _edge_cases()


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("case", sorted(EDGE))
@pytest.mark.parametrize("power", [0.0, 0.125, 0.5])
def test_edge_case_matrices(method, case, power):
  x = EDGE[case]
  out = htmuon_jax.spectral_power(jnp.asarray(x, jnp.float32), power,
                                  method=method)
  chex.assert_tree_all_finite(out)
  tol = (RANK_DEFICIENT_TOL if case in RANK_DEFICIENT_CASES else EXACT_TOL)
  assert rel_err(out, spectral_power_ref(x, power)) < tol[method]


@pytest.mark.parametrize("case", sorted(EDGE))
def test_edge_case_matrices_newton_schulz(case):
  out = htmuon_jax.spectral_power(jnp.asarray(EDGE[case], jnp.float32), 0.0,
                                  method="newton_schulz")
  chex.assert_tree_all_finite(out)
  # Muon's quintic leaves singular values in a band around one.
  s = np.linalg.svd(np.asarray(out, np.float64), compute_uv=False)
  assert 0.5 < s.max() < 1.3


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("shape", [(4, 6), (1, 8192), (3, 1, 5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zeros_and_denormals_give_exact_zeros(method, shape, dtype):
  for value in (0.0, 1e-40):  # 1e-40 is an fp32 denormal (flushed on CPU)
    x = jnp.full(shape, value, dtype)
    power = 0.0 if method == "newton_schulz" else 0.125
    out = htmuon_jax.spectral_power(x, power, method=method)
    chex.assert_type(out, dtype)
    if value == 0.0:
      chex.assert_trees_all_equal(out, jnp.zeros(shape, dtype))
    chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_bf16_extreme_magnitudes(method, scale):
  rng = np.random.default_rng(1)
  x = jnp.asarray(scale * rng.standard_normal((8, 12)), jnp.bfloat16)
  out = htmuon_jax.spectral_power(x, 0.125, method=method)
  chex.assert_tree_all_finite(out)
  ref = spectral_power_ref(np.asarray(x.astype(jnp.float32)), 0.125)
  # One bf16 rounding of the result (2^-8 relative) plus the method's error.
  assert rel_err(out.astype(jnp.float32), ref) < 1e-2 + EXACT_TOL[method]


def _aliases():
  """Every optimizer alias the package exports, with small settings."""
  names = ["htmuon", "muon", "htnormuon", "htadamuon", "rmnp"]
  return [n for n in names if hasattr(htmuon_jax, n)]


def _make(name, **kwargs):
  return getattr(htmuon_jax, name)(learning_rate=0.01, **kwargs)


def _alias_configs():
  configs = [(n, {}) for n in _aliases()]
  configs.append(("htmuon", {"method": "eigh"}))
  if "stream" in getattr(spectral, "STATEFUL_METHODS", ()) or hasattr(
      htmuon_jax, "scale_by_stream_spectral_power"):
    configs.append(("htmuon", {"method": "stream"}))
  if "polynomial" in spectral.METHODS:
    configs.append(("htmuon", {"method": "polynomial"}))
  return configs


CONFIGS = _alias_configs()
CONFIG_IDS = [f"{n}-{k.get('method', 'default')}" for n, k in CONFIGS]


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(2)
  f = lambda *s: jnp.asarray(0.3 * rng.standard_normal(s), dtype)
  return {"w1": f(8, 16), "b1": f(16), "w2": f(16, 4), "norm": f(4)}


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_zero_gradients_give_zero_updates(name, kwargs):
  params = _params()
  opt = _make(name, **kwargs)
  state = opt.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(3):
    updates, state = jax.jit(opt.update)(zeros, state, params)
    chex.assert_trees_all_equal(updates, zeros)


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_non_finite_gradients_are_skipped_by_apply_if_finite(name, kwargs):
  """NaN/Inf gradients propagate (like optax); `optax.apply_if_finite` guards
  the whole state, this package's momentum and bases included."""
  params = _params()
  good = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
  bad = dict(good, w1=good["w1"].at[0, 0].set(jnp.nan))

  raw = _make(name, **kwargs)
  updates, _ = raw.update(bad, raw.init(params), params)
  assert not bool(jnp.all(jnp.isfinite(updates["w1"])))  # propagates

  opt = optax.apply_if_finite(_make(name, **kwargs), max_consecutive_errors=3)
  state = opt.init(params)
  update = jax.jit(opt.update)
  updates, state = update(good, state, params)
  before = state.inner_state
  for g in (bad, dict(good, w2=good["w2"].at[1, 1].set(jnp.inf))):
    updates, state = update(g, state, params)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(state.inner_state, before)
  assert int(state.notfinite_count) == 2
  updates, state = update(good, state, params)
  chex.assert_tree_all_finite(updates)
  assert int(state.notfinite_count) == 0


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_bitwise_deterministic(name, kwargs):
  params = _params()
  rng = np.random.default_rng(3)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape),
                                              jnp.float32), params)
           for _ in range(3)]

  def run():
    opt = _make(name, **kwargs)
    state, p = opt.init(params), params
    step = jax.jit(opt.update)
    for g in grads:
      u, state = step(g, state, p)
      p = optax.apply_updates(p, u)
    return p

  chex.assert_trees_all_equal(run(), run())


def _loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  h = h * params["norm"][None, :1]
  return jnp.mean((h @ params["w2"] - y) ** 2)


@pytest.mark.parametrize("mu_dtype", [None, jnp.float32])
@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_long_run_bf16_is_stable(name, kwargs, mu_dtype):
  """2,000 jitted steps with bf16 parameters: finite, and each matrix's norm
  stays within what decoupled weight decay allows given the largest raw
  update seen: ||W_T|| <= a^T ||W_0|| + (1 - a^T) max_t ||O_t|| / wd,
  a = 1 - lr * wd (plus bf16 rounding)."""
  lr, wd, steps = 0.01, 0.1, 2000
  params = _params(jnp.bfloat16)
  opt = _make(name, weight_decay=wd, mu_dtype=mu_dtype, **kwargs)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((64, 4)), jnp.float32)

  @jax.jit
  def run(params):
    def body(carry, _):
      p, s, max_o = carry
      g = jax.grad(_loss)(jax.tree.map(lambda a: a.astype(jnp.float32), p),
                          x, y)
      g = jax.tree.map(lambda a, b: a.astype(b.dtype), g, p)
      u, s = opt.update(g, s, p)
      # Raw direction O = -u / lr - wd * W of the matrix leaves.
      o_norm = {k: jnp.linalg.norm(-u[k].astype(jnp.float32) / lr
                                   - wd * p[k].astype(jnp.float32))
                for k in ("w1", "w2")}
      max_o = {k: jnp.maximum(max_o[k], o_norm[k]) for k in max_o}
      return (optax.apply_updates(p, u), s, max_o), None

    init = (params, opt.init(params), {"w1": 0.0, "w2": 0.0})
    (p, _, max_o), _ = jax.lax.scan(body, init, None, length=steps)
    return p, max_o

  final, max_o = run(params)
  chex.assert_tree_all_finite(final)
  a = (1 - lr * wd) ** steps
  for k in ("w1", "w2"):
    w0 = float(jnp.linalg.norm(params[k].astype(jnp.float32)))
    bound = a * w0 + (1 - a) * float(max_o[k]) / wd
    wt = float(jnp.linalg.norm(final[k].astype(jnp.float32)))
    assert wt <= 1.05 * bound + 1e-3, (k, wt, bound)
