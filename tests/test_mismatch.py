"""Mismatches never pass silently (issue 25): states made for other options,
injected hyperparameters out of range, gradients through an update, and
batched LAPACK under `jax.vmap`."""

import os
import subprocess
import sys
import textwrap

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
    (dict(method="stream", rank=2), dict(method="stream", rank=3), "rank"),
    (dict(method="svd"), dict(method="stream"), "ScaleByStreamState"),
    (
      dict(method="stream"),
      dict(method="stream", stream_side="fan_in"),
      "stream_side",
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


def test_stream_grad_documented_finite_and_nan_cases():
  # README (Reliability): "stream" is differentiated as written; finite at
  # a full-rank momentum with repeated values, NaN at a rank-deficient one
  # (QR has no derivative there).
  opt = htmuon_jax.htmuon(0.03, method="stream")
  grads = {}
  for name, g in (("eye", jnp.eye(6)), ("rank1", jnp.full((5, 4), 2.0))):
    state = opt.init(g)
    loss = lambda g, state=state: jnp.sum(opt.update(g, state, g)[0] ** 2)
    grads[name] = jax.grad(loss)(g)
  assert bool(jnp.all(jnp.isfinite(grads["eye"])))
  assert not bool(jnp.all(jnp.isfinite(grads["rank1"])))


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
