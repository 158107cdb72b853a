"""Mismatches never pass silently (issue 25): states made for other options,
injected hyperparameters out of range, gradients through an update, and
batched LAPACK under `jax.vmap`."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.test_util import check_grads

import htmuon_jax

P = jnp.ones((8, 6))
G = jax.random.normal(jax.random.key(0), (8, 6))


@pytest.mark.parametrize(
  "made,used,match",
  [
    (
      dict(method=htmuon_jax.methods.Stream(rank=2)),
      dict(method=htmuon_jax.methods.Stream(rank=3)),
      "rank",
    ),
    (dict(method="svd"), dict(method="stream"), "ScaleByStreamState"),
    (
      dict(method="stream"),
      dict(method=htmuon_jax.methods.Stream(side="fan_in")),
      "side",
    ),
    (dict(method="stream"), dict(method="svd"), "keeps no state"),
  ],
)
def test_mismatched_state_raises(made, used, match):
  state = htmuon_jax.htmuon(0.03, **made).init(P)
  with pytest.raises(ValueError, match=match):
    jax.jit(htmuon_jax.htmuon(0.03, **used).update)(G, state, P)


@pytest.mark.parametrize(
  "name,value",
  [("interval", 0), ("interval", -1), ("power", float("nan"))]
  + [("power", 1.5), ("power", -0.1)],
)
@pytest.mark.parametrize("method", ["svd", "stream"])
def test_injected_out_of_range_gives_nan(name, value, method):
  opt = optax.inject_hyperparams(htmuon_jax.htmuon)(
    learning_rate=0.03, interval=2, power=0.125, method=method
  )
  state = opt.init(P)
  state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)
  for _ in range(2):
    u, state = jax.jit(opt.update)(G, state, P)
  assert bool(jnp.all(jnp.isnan(u)))


@pytest.mark.parametrize("method", ["svd", "eigh", "auto"])
@pytest.mark.parametrize("g", [jnp.eye(6), jnp.full((5, 4), 2.0)])
def test_grad_through_update_finite(method, g):
  opt = htmuon_jax.htmuon(0.03, method=method)
  state = opt.init(g)
  grad = jax.grad(lambda g: jnp.sum(opt.update(g, state, g)[0] ** 2))(g)
  assert bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("qr", ["qr", "cholesky"])
@pytest.mark.parametrize("side", ["smaller", "fan_in"])
@pytest.mark.parametrize("shape", [(5, 4), (4, 5), (4, 4)])
def test_stream_jvp_matches_finite_differences(qr, side, shape):
  # At full rank the stream step's derivative (its QR's included) is the
  # true one: float64 central differences, forward and reverse mode.
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(2), shape, jnp.float64)
    basis = htmuon_jax.methods._stream.init_basis(shape, None, side)
    basis = basis.astype(jnp.float64)
    f = lambda x: htmuon_jax.methods._stream.stream_spectral_power(
      x, basis, 0.3, qr=qr, side=side
    )[0]
    check_grads(f, (x,), 1, modes=["fwd", "rev"], eps=1e-6)


RANK_DEFICIENT = {
  "rank1": jnp.full((5, 4), 2.0),
  # Y = N^T N V_0 has exactly zero columns here (R_jj == 0), where the
  # rank-1 matrix above leaves round-off in them: both must be finite.
  "one_column": jnp.zeros((5, 4)).at[:, 0].set(jnp.arange(1.0, 6.0)),
  "rank2_wide": jnp.outer(jnp.arange(1.0, 4.0), jnp.ones(5))
  + jnp.outer(jnp.ones(3), jnp.arange(5.0)),
  "zero": jnp.zeros((5, 4)),
}


@pytest.mark.parametrize("qr", ["qr", "cholesky"])
@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("name", sorted(RANK_DEFICIENT))
def test_stream_grad_finite_at_rank_deficient_momenta(qr, rank, name):
  # docs/reliability.md: the QR's derivative drops the directions that a
  # rank-deficient momentum does not span, so the gradient is finite on
  # every machine, whatever LAPACK leaves in R's dependent diagonal entries.
  g = RANK_DEFICIENT[name]
  opt = htmuon_jax.htmuon(
    0.03, method=htmuon_jax.methods.Stream(rank=rank, qr=qr)
  )
  state = opt.init(g)
  loss = lambda g: jnp.sum(opt.update(g, state, g)[0] ** 2)
  grad = jax.grad(loss)(g)
  assert bool(jnp.all(jnp.isfinite(grad))), grad
  if name == "zero":
    chex.assert_trees_all_equal(grad, jnp.zeros_like(g))


def test_stream_qr_jvp_drops_unspanned_columns():
  # Y with exactly zero columns: Q's completion there is arbitrary, so its
  # derivative is 0; the spanned column follows (I - q q^T) dy / r.
  y = jnp.zeros((4, 3)).at[:, 0].set(jnp.array([3.0, 0.0, 4.0, 0.0]))
  dy = jax.random.normal(jax.random.key(3), (4, 3))
  _, q_dot = jax.jvp(htmuon_jax.methods._stream._qr_basis, (y,), (dy,))
  q1 = y[:, 0] / 5.0
  sign = jnp.sign(htmuon_jax.methods._stream._qr_basis(y)[0, 0] / q1[0])
  want = sign * (dy[:, 0] - q1 * (q1 @ dy[:, 0])) / 5.0
  chex.assert_trees_all_close(q_dot[:, 0], want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(q_dot[:, 1:], jnp.zeros((4, 2)))


@pytest.mark.parametrize("method", ["svd", "eigh"])
@pytest.mark.parametrize("shape", [(5, 4), (4, 5), (4, 4)])
def test_exact_power_jvp_matches_finite_differences(method, shape):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(1), shape, jnp.float64)
    f = lambda x, p: htmuon_jax.spectral_power(x, p, method=method)
    check_grads(lambda x: f(x, 0.3), (x,), 1, modes=["fwd", "rev"])
    check_grads(lambda p: f(x, p), (0.3,), 1, modes=["fwd", "rev"])
    for x in (jnp.eye(4), jnp.diag(jnp.array([3.0, 3.0, 1.0, 0.0]))):
      check_grads(lambda x: f(x, 0.3), (x.astype(jnp.float64),), 1, eps=1e-6)


VMAP_CASE = textwrap.dedent("""
  import re, jax, jax.numpy as jnp, htmuon_jax
  g = jnp.ones((3, 8, 6)) + jnp.eye(8, 6)
  for method in ("svd", "eigh"):
    opt = htmuon_jax.htmuon(0.03, method=method)
    st = jax.vmap(opt.init)(g)
    text = jax.jit(jax.vmap(opt.update)).lower(g, st, g).as_text()
    dims = re.findall(r'num_batch_dims = "(\\d+)"', text)
    assert dims and set(dims) == {"0"}, (method, dims)
  print("ok")
""")


def test_vmapped_update_has_no_batched_lapack():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
    [sys.executable, "-c", VMAP_CASE],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
