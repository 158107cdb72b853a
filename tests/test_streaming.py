"""Tests for the streaming power iteration (`method="stream"`)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import htmuon_jax
from htmuon_jax.methods import Stream
from htmuon_jax.methods import _stream as streaming
from htmuon_jax.methods import _stream as stream_lib
from tests.reference import matrix_with_spectrum, rel_err, spectral_power_ref


def stream_ref(
  mats, power, *, eps=1e-4, rank=None, spectrum="power", shift=0.0
):
  """The authors' streaming rule in numpy float64, over a list of matrices.

  V lives on the smaller side (N = x if x is tall, else x^T):
  V_t = QR(Y), Y = N^T N V_{t-1} (with `shift`: QR(Y / c + shift V_{t-1}),
  c = ||Y^T Y||_F^(1/2), the documented Cholesky-QR variant), U_t = colnormalize(N V_t),
  s_t = column norms of N V_t, out = U_t diag(f(s_t)) V_t^T, s <= eps max(s)
  counts as zero; f = s**p, or i**-p for the i-th largest s.
  """
  m, n = mats[0].shape[-2:]
  small = min(m, n)
  k = small if rank is None else min(rank, small)
  # V_0: the identity for a full rank, else a fixed-seed random orthonormal
  # basis (numpy's QR of a seed-0 Gaussian, signs fixed: `init_basis`).
  if k == small:
    v = np.eye(small, k)
  else:
    q, r = np.linalg.qr(np.random.default_rng(0).standard_normal((small, k)))
    v = q * np.sign(np.diag(r))
  outs = []
  for x in mats:
    x = np.asarray(x, np.float64)
    mat = x if m >= n else x.T
    y = mat.T @ (mat @ v)
    if shift:
      y = y / np.sqrt(np.linalg.norm(y.T @ y)) + shift * v
    v, _ = np.linalg.qr(y)
    nv = mat @ v
    s = np.linalg.norm(nv, axis=0)
    keep = s > eps * s.max()
    if spectrum == "power":
      f = np.where(keep, np.where(keep, s, 1.0) ** power, 0.0)
    else:
      order = sorted(range(k), key=lambda i: -s[i])
      ranks = np.empty(k)
      ranks[order] = np.arange(1, k + 1)
      f = np.where(keep, ranks**-power, 0.0)
    u = nv / np.where(keep, s, 1.0)
    out = (u * f) @ v.T
    outs.append(out if m >= n else out.T)
  return outs


def drifting_matrices(seed, m, n, steps, drift=0.02):
  """A slowly changing matrix with well-separated singular values."""
  rng = np.random.default_rng(seed)
  k = min(m, n)
  base = matrix_with_spectrum(rng, m, n, np.linspace(3.0, 0.5, k))
  return [
    (base + drift * rng.standard_normal((m, n))).astype(np.float32)
    for _ in range(steps)
  ]


def run_stream(mats, power, **kw):
  rank = kw.pop("rank", None)
  basis = streaming.init_basis(mats[0].shape, rank)
  step = jax.jit(
    lambda x, b: streaming.stream_spectral_power(x, b, power, **kw)
  )
  outs = []
  for x in mats:
    out, basis = step(jnp.asarray(x), basis)
    outs.append(np.asarray(out))
  return outs, basis


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (7, 7)])
@pytest.mark.parametrize("power", [0.0, 0.125, 0.5])
def test_matches_numpy_rule_over_steps(shape, power):
  mats = drifting_matrices(0, *shape, steps=6)
  outs, basis = run_stream(mats, power)
  refs = stream_ref(mats, power)
  for out, ref in zip(outs, refs):
    # fp32 iteration vs float64 on a spectrum with gaps >= 0.3: round-off
    # amplified by ~1/gap over 6 steps; measured <= 5e-7, 10x margin.
    assert rel_err(out, ref) < 5e-6
  chex.assert_trees_all_close(
    jnp.swapaxes(basis, -1, -2) @ basis, jnp.eye(basis.shape[-1]), atol=1e-5
  )  # orthonormal to fp32 round-off


@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("spectrum", ["power", "rank"])
def test_rank_and_spectrum_match_numpy_rule(rank, spectrum):
  mats = drifting_matrices(1, 9, 6, steps=5)
  outs, basis = run_stream(mats, 0.25, rank=rank, spectrum=spectrum)
  chex.assert_shape(basis, (6, rank))
  for out, ref in zip(
    outs, stream_ref(mats, 0.25, rank=rank, spectrum=spectrum)
  ):
    assert rel_err(out, ref) < 5e-6  # as above


def test_cholesky_matches_shifted_rule():
  mats = drifting_matrices(2, 10, 6, steps=6)
  outs, _ = run_stream(mats, 0.125, qr="cholesky")
  refs = stream_ref(mats, 0.125, shift=stream_lib._CHOLESKY_SHIFT)
  for out, ref in zip(outs, refs):
    # Cholesky-QR2 of a basis with condition number <= 1e3 is orthonormal to
    # fp32 round-off (Yamamoto et al. 2015): the same tolerance as for QR.
    assert rel_err(out, ref) < 5e-6


@pytest.mark.parametrize("rank", [48, 3])
@pytest.mark.parametrize("scale", [1.0, 1e-20])
def test_cholesky_basis_is_orthonormal_for_rank_deficient_input(rank, scale):
  # Y = A V of a rank-deficient Gram matrix A (singular values over 1e3):
  # plain Cholesky-QR would break down (NaN); the shift keeps it full rank.
  rng = np.random.default_rng(12)
  n = 48
  u, _ = np.linalg.qr(rng.standard_normal((n, n)))
  s = np.concatenate([np.geomspace(1, 1e-3, rank), np.zeros(n - rank)])
  v, _ = np.linalg.qr(rng.standard_normal((n, n)))
  y = scale * ((u * s**2) @ u.T @ v)
  q = stream_lib._orthonormalize(
    jnp.asarray(y, jnp.float32), jnp.asarray(v, jnp.float32), "cholesky"
  )
  # Orthonormal to fp32 round-off (measured <= 1.1e-6 up to 1024 x 1024).
  chex.assert_trees_all_close(q.T @ q, np.eye(n), atol=1e-5)


@pytest.mark.parametrize("qr", ["qr", "cholesky"])
@pytest.mark.parametrize("shape", [(16, 6), (3, 6, 16)])
def test_converges_to_svd_on_a_fixed_matrix(qr, shape):
  rng = np.random.default_rng(3)
  x = rng.standard_normal(shape).astype(np.float32)
  outs, _ = run_stream([x] * 250, 0.125, qr=qr)
  # Adjacent eigenvalue ratios of these Gram matrices reach 0.93, so the
  # error falls as ~0.93**t: measured 2.6e-5 at 150 steps, 7e-7 at 200 and
  # fp32 round-off (2e-7) from 250; the first step is off by 0.15-0.2.
  assert rel_err(outs[-1], spectral_power_ref(x, 0.125)) < 1e-5
  assert rel_err(outs[0], spectral_power_ref(x, 0.125)) > 1e-3


def test_tiny_singular_values_follow_the_package_rule():
  # rank 2 of 8: fp32 noise directions must map to 0, not to (1e-7)**p.
  rng = np.random.default_rng(4)
  x = matrix_with_spectrum(rng, 12, 8, [2.0, 1.0] + [0.0] * 6).astype(
    np.float32
  )
  outs, _ = run_stream([x] * 40, 0.125)
  ref = spectral_power_ref(x, 0.125)
  assert rel_err(outs[-1], ref) < 1e-5  # fp32 round-off of a rank-2 matrix
  assert np.linalg.matrix_rank(outs[-1], tol=1e-4) == 2


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_extreme_scales_neither_overflow_nor_underflow(scale):
  mats = drifting_matrices(11, 8, 5, steps=3)
  outs, _ = run_stream([m * np.float32(scale) for m in mats], 0.125)
  for out, ref in zip(outs, stream_ref(mats, 0.125)):
    # U S^p V^T scales by scale**p; fp32 round-off as in the unit-scale test.
    assert rel_err(out / scale**0.125, ref) < 5e-6


@pytest.mark.parametrize("qr", ["qr", "cholesky"])
def test_zero_matrix_gives_zero_and_keeps_basis(qr):
  basis = streaming.init_basis((2, 5, 3))
  x = jnp.asarray(
    np.random.default_rng(5).standard_normal((2, 5, 3)), jnp.float32
  )
  step = jax.jit(
    lambda x, b: streaming.stream_spectral_power(x, b, 0.125, qr=qr)
  )
  _, basis = step(x, basis)
  out, new_basis = step(jnp.zeros((2, 5, 3)), basis)
  chex.assert_trees_all_equal(out, jnp.zeros((2, 5, 3)))
  chex.assert_trees_all_equal(new_basis, basis)


@pytest.mark.slow
@pytest.mark.parametrize("qr", ["qr", "cholesky"])
@pytest.mark.parametrize("shape", [(2, 6, 4), (2, 4, 6), (2, 5, 5)])
def test_zero_matrix_and_zero_basis_give_zeros_without_nan(qr, shape):
  """The zero padding of the distributed step (a zero matrix with a zero
  basis) gives zeros, and no NaN even in intermediates: run op by op with
  NaN checks, so a masked NaN (e.g. Cholesky of a zero Gram matrix) would
  raise."""
  small = min(shape[1:])
  for basis in (
    jnp.zeros(shape[:1] + (small, 3)),
    streaming.init_basis(shape, 3),
  ):
    with jax.disable_jit(), jax.debug_nans(True):
      out, new_basis = streaming.stream_spectral_power(
        jnp.zeros(shape), basis, 0.125, qr=qr
      )
    chex.assert_trees_all_equal(out, jnp.zeros(shape))
    chex.assert_trees_all_equal(new_basis, basis)


def test_transformation_state_and_dtype():
  params = {
    "w": jnp.zeros((6, 4), jnp.bfloat16),
    "b": jnp.zeros(4),
    "conv": jnp.zeros((3, 3, 2, 5)),
  }
  dims = {
    "w": htmuon_jax.MuonDimensionNumbers(),
    "b": None,
    "conv": htmuon_jax.MuonDimensionNumbers((0, 1, 2), 3),
  }
  tx = htmuon_jax.scale_by_spectral_power(
    0.125, method=Stream(rank=3), weight_dimension_numbers=dims
  )
  state = tx.init(params)
  assert isinstance(state.basis["b"], optax.MaskedNode)
  chex.assert_shape(state.basis["w"], (1, 4, 3))
  chex.assert_shape(state.basis["conv"], (1, 5, 3))  # fan_in 18, fan_out 5
  grads = jax.tree.map(
    lambda p: jnp.asarray(
      np.random.default_rng(6).standard_normal(p.shape), p.dtype
    ),
    params,
  )
  out, state = jax.jit(tx.update)(grads, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)
  chex.assert_trees_all_equal(out["b"], grads["b"])


def test_conv_kernel_uses_the_reduction_axes():
  rng = np.random.default_rng(7)
  kernel = rng.standard_normal((2, 2, 3, 4)).astype(np.float32)
  dims = htmuon_jax.MuonDimensionNumbers((0, 1, 2), 3)
  tx = htmuon_jax.scale_by_spectral_power(
    0.5, method="stream", weight_dimension_numbers=dims
  )
  state = tx.init({"k": kernel})
  out, _ = jax.jit(tx.update)({"k": jnp.asarray(kernel)}, state)
  ref = stream_ref([kernel.reshape(12, 4)], 0.5)[0].reshape(kernel.shape)
  assert rel_err(out["k"], ref) < 5e-6  # fp32 round-off, one step


def test_jit_traces_once_and_matches_eager():
  mats = drifting_matrices(8, 6, 4, steps=4)
  tx = htmuon_jax.scale_by_spectral_power(0.125, method="stream")
  traces = []

  def update(g, s):
    traces.append(1)
    return tx.update(g, s)

  jitted = jax.jit(update)
  s_jit = s_eager = tx.init({"w": mats[0]})
  for x in mats:
    o_jit, s_jit = jitted({"w": jnp.asarray(x)}, s_jit)
    o_eager, s_eager = tx.update({"w": jnp.asarray(x)}, s_eager)
    chex.assert_trees_all_close(o_jit, o_eager, atol=1e-6)
  assert len(traces) == 1


def test_checkpoint_roundtrip_continues_identically(tmp_path):
  import orbax.checkpoint as ocp

  mats = drifting_matrices(9, 8, 5, steps=4)
  tx = htmuon_jax.scale_by_spectral_power(0.125, method="stream")
  params = {"w": jnp.asarray(mats[0]), "b": jnp.zeros(5)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  for x in mats[:2]:
    _, state = step({"w": jnp.asarray(x), "b": jnp.ones(5)}, state)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "state", state)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / "state", state)
  chex.assert_trees_all_equal(restored, state)
  for x in mats[2:]:
    g = {"w": jnp.asarray(x), "b": jnp.ones(5)}
    out_a, state = step(g, state)
    out_b, restored = step(g, restored)
    chex.assert_trees_all_equal(out_a, out_b)


def test_power_can_be_injected():
  mats = drifting_matrices(10, 6, 4, steps=3)
  tx = optax.inject_hyperparams(htmuon_jax.scale_by_spectral_power)(
    power=0.5, method="stream"
  )
  state = tx.init({"w": mats[0]})
  step = jax.jit(tx.update)
  refs = stream_ref(mats, 0.25)
  for i, x in enumerate(mats):
    state.hyperparams["power"] = jnp.asarray(0.5 if i == 0 else 0.25)
    out, state = step({"w": jnp.asarray(x)}, state)
    if i:  # power changed after the first step: no recompilation needed
      assert rel_err(out["w"], refs[i]) < 5e-6  # fp32 round-off


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"rank": 0}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"qr": "householder"}, "qr"),
    ({"side": "out"}, "side"),
  ],
)
def test_bad_options_raise(kwargs, name):
  with pytest.raises(ValueError, match=name):
    Stream(**kwargs)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"power": 2.0}, "power"),
    ({"eps": -1.0}, "eps"),
    ({"spectrum": "log"}, "spectrum"),
  ],
)
def test_bad_arguments_raise(kwargs, name):
  with pytest.raises(ValueError, match=name):
    htmuon_jax.scale_by_spectral_power(method="stream", **kwargs)


def test_spectral_power_rejects_stream():
  with pytest.raises(ValueError, match="stream"):
    htmuon_jax.spectral_power(jnp.ones((3, 3)), 0.125, method="stream")
