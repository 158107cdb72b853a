"""`method="stream"`: one step of subspace iteration per training step (stateful).

The carried basis tracks the momentum's singular vectors; design and
orientation: docs/methods.md. Real matrices only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from htmuon_jax import _numerics as numerics
from htmuon_jax import sharding as sharding_lib
from htmuon_jax.methods import _base as base
from htmuon_jax._numerics import HIGHEST


ORTHONORMALIZATIONS = ("qr", "cholesky")
# Where the basis V lives: the smaller side of each matrix (default), or its
# fan-in side (the authors' orientation).
SIDES = ("smaller", "fan_in")
# Cholesky-QR's shift delta: two fp32 passes stay stable (condition <= 1e3),
# a smaller one breaks down; the derivation is in docs/methods.md.
_CHOLESKY_SHIFT = 1e-3


@sharding_lib.per_matrix_state("basis")
class ScaleByStreamState(NamedTuple):
  """State of `scale_by_spectral_power(method="stream")`."""

  # Per matrix leaf: float32 (batch, d, rank) orthonormal basis, d the
  # basis side's size; `optax.MaskedNode()` for other leaves.
  basis: Any


def _check_rank(rank: Optional[int]) -> None:
  if isinstance(rank, (jax.Array, np.ndarray, np.generic)):
    raise ValueError(
      f"rank must be a static Python int (it sets the shape of the basis), "
      f"got an array {rank!r}. Under optax.inject_hyperparams list it in "
      "static_args, e.g. static_args=('rank',)."
    )
  if rank is not None and (
    isinstance(rank, bool) or not isinstance(rank, int) or rank < 1
  ):
    raise ValueError(f"rank must be None or a positive int, got {rank!r}.")


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
  if value not in choices:
    raise ValueError(
      f"{name}: unknown value {value!r}; expected one of {choices}."
    )


def init_basis(
  shape: tuple[int, ...], rank: Optional[int] = None, side: str = "smaller"
) -> jax.Array:
  """`V_0`, float32 `(..., d, k)`, for `(..., m, n)` matrices (`m` = fan_in).

  The identity (`rank=None`, or `side="fan_in"` as the authors), else a
  fixed-seed random orthonormal basis: the first `k` identity columns can be
  orthogonal to a momentum (a dead unit), whose update would stay zero.
  """
  _check_rank(rank)
  _check_choice(side, SIDES, "side")
  *batch, m, n = shape
  small = min(m, n)
  k = small if rank is None else min(rank, small)
  d = small if side == "smaller" else m
  # side="fan_in" is the authors' orientation: their identity start too.
  if rank is not None and k < d and side == "smaller":
    gauss = np.random.default_rng(0).standard_normal((d, k))
    q, r = np.linalg.qr(gauss)  # numpy, at init: no LAPACK call under jit
    v0 = jnp.asarray(q * np.sign(np.diag(r)), jnp.float32)
  else:
    v0 = jnp.eye(d, k, dtype=jnp.float32)
  return jnp.broadcast_to(v0, (*batch, d, k))


def _gram(y: jax.Array) -> jax.Array:
  return jnp.matmul(jnp.swapaxes(y, -1, -2), y, precision=HIGHEST)


def _cholesky_qr(y: jax.Array, gram: jax.Array) -> jax.Array:
  """`Y R^-1` with `R^T R = gram = Y^T Y` (one Cholesky-QR pass)."""
  chol = jnp.linalg.cholesky(gram)
  # Q = Y L^-T, i.e. solve Q L^T = Y.
  return jax.lax.linalg.triangular_solve(
    chol, y, left_side=False, lower=True, transpose_a=True
  )


def _norm(x: jax.Array, axis: Any, keepdims: bool = False) -> jax.Array:
  """The 2-norm over `axis`, with derivative 0 (not NaN) at zero."""
  sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _rank_tolerance(r: jax.Array) -> jax.Array:
  """Smallest |R_jj| (per matrix) that counts as a new direction of `Y`."""
  d = jnp.abs(jnp.diagonal(r, axis1=-2, axis2=-1))
  # Round-off in Householder QR leaves |R_jj| ~ eps ||Y|| on dependent
  # columns; 16 sqrt(rows) eps of the largest is well above that.
  scale = 16.0 * (r.shape[-2] ** 0.5) * jnp.finfo(r.dtype).eps
  return scale * jnp.max(d, axis=-1, keepdims=True)


@jax.custom_jvp
def _qr_basis(y: jax.Array) -> jax.Array:
  """`Q` of the thin QR of `(..., d, k)` matrices, `d >= k`."""
  return numerics.lapack_per_matrix(jnp.linalg.qr, y)[0]


@_qr_basis.defjvp
def _qr_basis_jvp(primals, tangents):
  """QR's derivative; 0 on columns whose `|R_jj|` is at round-off (such a
  `q_j` is arbitrary, its singular value cut anyway): finite on any input."""
  (y,), (y_dot,) = primals, tangents
  q, r = numerics.lapack_per_matrix(jnp.linalg.qr, y)
  diag = jnp.abs(jnp.diagonal(r, axis1=-2, axis2=-1))
  keep = diag > _rank_tolerance(r)  # (..., k)
  both = keep[..., :, None] & keep[..., None, :]
  eye = jnp.eye(r.shape[-1], dtype=r.dtype)
  r_safe = jnp.where(both, r, eye)
  cols = keep[..., None, :].astype(y.dtype)
  x = jax.lax.linalg.triangular_solve(
    r_safe, y_dot * cols, left_side=False, lower=False
  )
  x = x * cols
  c = jnp.matmul(jnp.swapaxes(q, -1, -2), x, precision=HIGHEST)
  c = c * keep[..., :, None].astype(c.dtype)
  low = jnp.tril(c, -1)
  q_dot = x + jnp.matmul(
    q, low - jnp.swapaxes(low, -1, -2) - c, precision=HIGHEST
  )
  return q, q_dot * cols


def _orthonormalize(y: jax.Array, v: jax.Array, qr: str) -> jax.Array:
  """An orthonormal basis of span(y); keeps `v` where `y` is all zero."""
  norm = _norm(y, axis=(-2, -1), keepdims=True)
  if qr == "qr":
    q = _qr_basis(y)
  else:
    y = y / jnp.where(norm > 0, norm, 1.0)  # no overflow in the Gram below
    c = jnp.sqrt(_norm(_gram(y), axis=(-2, -1), keepdims=True))
    y = y / jnp.where(c > 0, c, 1.0) + _CHOLESKY_SHIFT * v
    # A zero `y` whose `v` is zero too (the zero padding of the distributed
    # step) has a singular Gram matrix: factor the identity's columns instead
    # (no NaN, even in intermediates; the result is discarded below).
    y = jnp.where(norm > 0, y, jnp.eye(y.shape[-2], y.shape[-1], dtype=y.dtype))

    def cholesky_qr2(y: jax.Array) -> jax.Array:
      q = _cholesky_qr(y, _gram(y))
      return _cholesky_qr(q, _gram(q))  # second pass: orthonormal to round-off

    # Cholesky and the triangular solve are batched LAPACK/BLAS calls.
    q = numerics.lapack_per_matrix(cholesky_qr2, y)
  # A zero momentum carries no direction: keep the previous basis rather than
  # letting it collapse (a zero V would stay zero forever).
  return jnp.where(norm > 0, q, v)


def _stream_step(
  x: jax.Array,
  basis: jax.Array,
  power: Any,
  eps: Any,
  values: base.ValuesFn,
  qr: str,
  side: str,
) -> tuple[jax.Array, jax.Array]:
  """One streaming step on power-of-two scaled `x` (see the module)."""
  m, n = x.shape[-2:]
  # mat = x or x^T, so that V lives on mat's column side (the small side, or
  # fan-in: the PyTorch (out, in) matrix); the basis keeps its own dtype.
  tall = m >= n if side == "smaller" else False
  mat = x.astype(numerics.compute_dtype(x.dtype))
  state_dtype, basis = basis.dtype, basis.astype(mat.dtype)
  if not tall:
    mat = jnp.swapaxes(mat, -1, -2)
  mat_t = jnp.swapaxes(mat, -1, -2)
  y = jnp.matmul(
    mat_t, jnp.matmul(mat, basis, precision=HIGHEST), precision=HIGHEST
  )
  new_basis = _orthonormalize(y, basis, qr)
  nv = jnp.matmul(mat, new_basis, precision=HIGHEST)  # U_t diag(s_t)
  s = _norm(nv, axis=-2)
  f = values(s, power, eps)
  # U_t diag(f(s_t)) = N V_t diag(f(s_t) / s_t); f is 0 wherever s_t is.
  scale = jnp.where(s > 0, f / jnp.where(s > 0, s, 1.0), 0.0)
  out = jnp.matmul(
    nv * scale[..., None, :], jnp.swapaxes(new_basis, -1, -2), precision=HIGHEST
  )
  if not tall:
    out = jnp.swapaxes(out, -1, -2)
  return out, new_basis.astype(state_dtype)


@dataclasses.dataclass(frozen=True)
class Stream(base.SpectralMethod):
  """`method="stream"`: the streaming power iteration (stateful).

  Attributes:
    rank: number of tracked singular directions per matrix; `None` tracks
      all `min(fan_in, fan_out)`. Static.
    qr: `"qr"` or `"cholesky"` (see `stream_spectral_power`).
    side: `"smaller"` or `"fan_in"` (see `stream_spectral_power`).
  """

  name = "stream"
  stateful = True
  ordered = True
  state_type = ScaleByStreamState

  rank: Optional[int] = None
  qr: str = "qr"
  side: str = "smaller"

  def check_options(self) -> None:
    _check_rank(self.rank)
    _check_choice(self.qr, ORTHONORMALIZATIONS, "Stream.qr")
    _check_choice(self.side, SIDES, "Stream.side")

  def init(self, shape: tuple[int, ...]) -> jax.Array:
    return init_basis(shape, self.rank, self.side)

  def explain_state_mismatch(
    self, got: tuple[int, ...], want: tuple[int, ...]
  ) -> str:
    if got[:-2] != want[:-2] or len(got) != len(want):
      return "the basis was made for other parameters (another matrix stack)"
    if got[-2] != want[-2]:
      return (
        f"the basis has {got[-2]} rows where Stream(side={self.side!r}) puts "
        f"{want[-2]}: the state was made with the other side (or for "
        "other parameters)"
      )
    return (
      f"the basis tracks {got[-1]} directions where this optimizer "
      f"(rank={self.rank!r}) tracks {want[-1]}: the state was made with "
      f"another rank (e.g. rank={got[-1]})"
    )

  def apply(self, x, state, power, eps, values):
    if jnp.iscomplexobj(x):
      raise ValueError(
        f'method="stream" does not support complex matrices (got '
        f'{x.dtype}); use method="svd", "eigh", "polynomial" or '
        '"newton_schulz".'
      )
    return _stream_step(x, state, power, eps, values, self.qr, self.side)


def stream_spectral_power(
  x: jax.Array,
  basis: jax.Array,
  power: Any,
  *,
  eps: Any = base.DEFAULT_EPS,
  spectrum: str = "power",
  qr: str = "qr",
  side: str = "smaller",
) -> tuple[jax.Array, jax.Array]:
  """One streaming step: `(out, new_basis)`, the spectral power of real
  `(..., m, n)` matrices `x` (`m` = fan_in) and the advanced float32 basis
  `(..., d, k)` (`init_basis`'s, same `side`). The options are `Stream`'s;
  ValueError for complex `x` or an unknown `qr` or `side`."""
  _check_choice(qr, ORTHONORMALIZATIONS, "qr")
  _check_choice(side, SIDES, "side")
  # `run_method` scales by a power of two (no fp32 overflow in N^T N) and
  # keeps non-finite matrices from the QR (NaN output, basis kept).
  return base.run_method(
    Stream(qr=qr, side=side), x, basis, power, eps, spectrum
  )
