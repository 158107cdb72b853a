"""spectral_power against an independent float64 SVD reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import htmuon_jax
from htmuon_jax import methods
from htmuon_jax import _numerics as numerics
from tests.multidevice import run_cases_on_8_cpu_devices
from tests.reference import matrix_with_spectrum, rel_err, spectral_power_ref

POWERS = (0.0, 0.0625, 0.125, 0.5, 1.0)


def _cases():
  rng = np.random.default_rng(0)
  return {
    "square": rng.standard_normal((12, 12)),
    "tall": rng.standard_normal((20, 8)),
    "wide": rng.standard_normal((8, 20)),
    "batched": rng.standard_normal((3, 6, 10)),
    # Rank 3 of 10 x 12: fp32 noise singular values must be cut, not
    # raised to the power p.
    "rank_deficient": rng.standard_normal((10, 3))
    @ rng.standard_normal((3, 12)),
    # Singular values spanning 1e2 with random singular vectors.
    "spread": matrix_with_spectrum(rng, 16, 24, np.logspace(0, -2, 16)),
  }


CASES = _cases()

# fp32 SVD is backward stable: errors of a few ulp (6e-8) times a small
# dimension factor. The Gram route of "eigh" squares the condition number
# (up to 1e2 here for the non-singular cases), so it gets 1e-4.
TOL = {"svd": 1e-5, "eigh": 1e-4}


@pytest.mark.parametrize("method", ["svd", "eigh"])
@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_svd(method, power, case):
  x = CASES[case]
  out = htmuon_jax.spectral_power(
    jnp.asarray(x, jnp.float32), power, method=method
  )
  chex.assert_shape(out, x.shape)
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)
  assert rel_err(out, spectral_power_ref(x, power)) < TOL[method]


def test_power_one_returns_input():
  x = jnp.asarray(CASES["square"], jnp.float32)
  chex.assert_trees_all_equal(htmuon_jax.spectral_power(x, 1.0), x)


@pytest.mark.parametrize("method", ["svd", "eigh"])
def test_power_zero_is_orthogonal(method):
  x = jnp.asarray(CASES["tall"], jnp.float32)
  o = htmuon_jax.spectral_power(x, 0.0, method=method)
  # Columns of U V^T for a full-rank tall matrix are orthonormal.
  chex.assert_trees_all_close(o.T @ o, jnp.eye(8), atol=1e-5)


@pytest.mark.parametrize("method", ["svd", "eigh", "newton_schulz"])
@pytest.mark.parametrize("shape", [(6, 9), (2, 5, 5)])
def test_zero_matrix_gives_zero(method, shape):
  out = htmuon_jax.spectral_power(jnp.zeros(shape), 0.0, method=method)
  chex.assert_trees_all_equal(out, jnp.zeros(shape))
  if method != "newton_schulz":
    out = htmuon_jax.spectral_power(jnp.zeros(shape), 0.125, method=method)
    chex.assert_trees_all_equal(out, jnp.zeros(shape))


def test_rank_deficient_power_zero_keeps_rank():
  x = jnp.asarray(CASES["rank_deficient"], jnp.float32)
  o = htmuon_jax.spectral_power(x, 0.0, method="svd")
  # U_r V_r^T has exactly r singular values equal to one, the rest zero.
  s = np.linalg.svd(np.asarray(o, np.float64), compute_uv=False)
  np.testing.assert_allclose(s[:3], 1.0, atol=1e-5)
  np.testing.assert_allclose(s[3:], 0.0, atol=1e-5)


def test_eps_cutoff_rule():
  rng = np.random.default_rng(1)
  s = np.array([1.0, 0.5, 2e-3, 5e-5])  # the last is below eps * s_max
  x = matrix_with_spectrum(rng, 6, 4, s)
  out = htmuon_jax.spectral_power(
    jnp.asarray(x, jnp.float32), 0.125, method="svd", eps=1e-4
  )
  got = np.linalg.svd(np.asarray(out, np.float64), compute_uv=False)
  np.testing.assert_allclose(got[:3], s[:3] ** 0.125, rtol=1e-5)
  assert got[3] < 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_dtype_preserved(dtype):
  x = jnp.asarray(CASES["wide"], dtype)
  out = htmuon_jax.spectral_power(x, 0.125, method="svd")
  chex.assert_type(out, dtype)
  # Computed in fp32 from the rounded input, then rounded once: within a few
  # bf16 ulps (2**-8 relative) of the reference on the rounded input.
  ref = spectral_power_ref(np.asarray(x.astype(jnp.float32)), 0.125)
  assert rel_err(out.astype(jnp.float32), ref) < 1e-2


def test_traced_power_does_not_recompile():
  traces = []

  @jax.jit
  def f(x, p):
    traces.append(None)
    return htmuon_jax.spectral_power(x, p, method="svd")

  x = jnp.asarray(CASES["square"], jnp.float32)
  for p in (0.0, 0.125, 0.5):
    out = f(x, jnp.float32(p))
    assert rel_err(out, spectral_power_ref(CASES["square"], p)) < 1e-5
  assert len(traces) == 1


def test_vmap_matches_batched():
  x = jnp.asarray(CASES["batched"], jnp.float32)
  batched = htmuon_jax.spectral_power(x, 0.25, method="eigh")
  vmapped = jax.vmap(
    lambda m: htmuon_jax.spectral_power(m, 0.25, method="eigh")
  )(x)
  chex.assert_trees_all_close(batched, vmapped, atol=1e-6)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(power=-0.1), "power"),
    (dict(power=1.5), "power"),
    (dict(power=0.1, method="qr"), "method"),
    (dict(power=0.5, method="newton_schulz"), "newton_schulz"),
    (dict(power=0.1, eps=-1.0), "eps"),
    (dict(power=np.ones(2)), "power"),
  ],
)
def test_invalid_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    htmuon_jax.spectral_power(jnp.ones((3, 4)), **kwargs)


def test_vector_input_rejected():
  with pytest.raises(ValueError, match="rank >= 2"):
    htmuon_jax.spectral_power(jnp.ones(4), 0.5)


def test_auto_resolves_per_backend():
  assert methods.resolve_method("auto") in methods.method_names(stateful=False)
  assert methods.resolve_method("auto") != "newton_schulz"  # must be exact
  assert methods.resolve_method("eigh") == "eigh"


def test_lapack_per_matrix_keeps_the_batched_call_on_one_device():
  # One device: no pool contention, so the batched call runs unchanged (the
  # per-matrix path is compared with it on 8 devices, lapack_batch_cases.py).
  x = jax.random.normal(jax.random.key(0), (2, 3, 6, 4), jnp.float32)
  got = jax.jit(lambda x: numerics.lapack_per_matrix(jnp.linalg.qr, x))(x)
  for a, b in zip(got, jax.jit(jnp.linalg.qr)(x)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
@pytest.mark.multidevice
def test_batched_lapack_after_collectives_completes_on_8_cpu_devices():
  # The cases hung (timeout) before `lapack_per_matrix`; they take ~20 s.
  run_cases_on_8_cpu_devices("lapack_batch_cases.py", timeout=300)
