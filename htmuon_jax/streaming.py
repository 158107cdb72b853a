"""Streaming power iteration: `U diag(s**p) V^T` with a basis kept across steps.

The HTMuon authors' cheap alternative to an SVD per step: the momentum
changes slowly, so one step of orthogonal (subspace) iteration per training
step, started from the previous step's basis, tracks its singular vectors.
For a matrix `N` (oriented so that `V` lives on its smaller side, or with
`side="fan_in"` on its fan-in side as in the authors' code) and the carried
orthonormal basis `V_{t-1}` (`k` columns; `V_0` = the first `k` columns of
the identity, or, on the default side, a fixed-seed random orthonormal
basis when a `rank` below the basis side is given, see `init_basis`):

    V_t = orth(N^T N V_{t-1})            # one QR or Cholesky-QR step
    U_t = colnormalize(N V_t),  s_t = ||N V_t||_col   (= diag(U_t^T N V_t))
    out = U_t diag(f(s_t)) V_t^T         # f(s) = s**p, or i**-p by rank

Cost per matrix (`m >= n`, rank `k`): four products of `m x n` by `n x k`
size (`8 m n k` flops) and an `n x k` QR, against a full SVD. It is exact
once `V_t` has converged to the right singular vectors; early on, and for
the directions whose singular values are close to each other, it is an
approximation (see BENCHMARKS.md, "Streaming power iteration").

Tiny singular values: the package's rule applies as for every method,
`s <= eps * max(s)` counts as zero (`eps` relative, default 1e-4). The
authors' code zeroes `s <= 1e-8` (absolute). For momenta of the usual size
both remove only fp32 noise; the relative rule does not depend on the scale
of the gradients (a momentum of size 1e-8, e.g. after a tiny loss scale,
would be zeroed entirely by the absolute rule).

Orientation: the authors iterate `V_t = QR(N^T N V_{t-1})` on the PyTorch
`(out, in)` matrix, so their `V` lives on the fan-in side (the larger side
of a wide PyTorch matrix). By default (`side="smaller"`) `V` lives on the
smaller side of the matrix instead, which makes the basis and its QR as
small as they can be (for a square Flax `(in, out)` kernel this is the
fan-out side); `side="fan_in"` is the authors' orientation. Both converge
to the same `U diag(f(s)) V^T`, from different starts.

Complex matrices are not supported (the basis is real): `method="svd"`,
`"eigh"`, `"polynomial"` and `"newton_schulz"` accept them.
"""

from __future__ import annotations

from typing import Any, Optional

import chex
import optax
import jax

from htmuon_jax import dimension_numbers as dn
from htmuon_jax import methods
from htmuon_jax import sharding as sharding_lib
from htmuon_jax.checks import check_eps
from htmuon_jax.checks import check_power
from htmuon_jax.methods.stream import ORTHONORMALIZATIONS
from htmuon_jax.methods.stream import SIDES
from htmuon_jax.methods.stream import ScaleByStreamState
from htmuon_jax.methods.stream import Stream
from htmuon_jax.methods.stream import check_qr
from htmuon_jax.methods.stream import check_side
from htmuon_jax.methods.stream import init_basis

__all__ = [
  "ORTHONORMALIZATIONS",
  "SIDES",
  "ScaleByStreamState",
  "Stream",
  "init_basis",
  "scale_by_stream_spectral_power",
  "stream_spectral_power",
]


def stream_spectral_power(
  x: jax.Array,
  basis: jax.Array,
  power: Any,
  *,
  eps: Any = methods.DEFAULT_EPS,
  spectrum: str = "power",
  qr: str = "qr",
  side: str = "smaller",
) -> tuple[jax.Array, jax.Array]:
  """One streaming step: the spectral power of `x` and the advanced basis.

  Args:
    x: real matrices `(..., m, n)` (`m` = fan_in).
    basis: the carried basis `(..., d, k)` (from `init_basis` with the same
      `side`, or the previous call), orthonormal columns.
    power: exponent `p` in [0, 1]; may be traced.
    eps: relative cutoff: `s <= eps * max(s)` counts as zero.
    spectrum: `"power"` (`s**p`) or `"rank"` (`i**-p`, ranked by `s_t`).
    qr: `"qr"` (Householder) or `"cholesky"` (Cholesky-QR2 of the shifted
      `Y / c + 1e-3 V`, i.e. one step on `N^T N + 1e-3 c I`, which has the
      same singular vectors: small Cholesky factorizations instead of a QR;
      singular values below ~0.03 s_max are tracked less well).
    side: `"smaller"`: `V` on the smaller side of `x` (`d = min(m, n)`); or
      `"fan_in"`: `V` on the fan-in side (`d = m`), i.e. the authors'
      `V_t = QR(N^T N V_{t-1})` on the PyTorch `(out, in)` matrix `N = x^T`.

  Returns:
    `(out, new_basis)`: `out` has the shape and dtype of `x`, `new_basis` the
    shape of `basis` (float32).

  Raises:
    ValueError: for complex `x` (use another method), or an unknown `qr` or
      `side`.
  """
  check_qr(qr, "qr")
  check_side(side, "side")
  # Exact power-of-two scaling (in `run_method`) as in spectral_power: N^T N
  # of a 1e30 (or 1e-30) momentum would overflow (underflow) fp32. A
  # non-finite matrix never reaches the QR (LAPACK may hang on it): its
  # output is NaN and its basis is kept (`run_method`).
  return methods.run_method(
    Stream(qr=qr, side=side), x, basis, power, eps, spectrum
  )


def scale_by_stream_spectral_power(
  power: chex.Numeric = 0.125,
  *,
  eps: chex.Numeric = methods.DEFAULT_EPS,
  spectrum: str = "power",
  rank: Optional[int] = None,
  stream_qr: str = "qr",
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  distribute: sharding_lib.ExecutionLike = None,
  stream_side: str = "smaller",
) -> optax.GradientTransformation:
  """`U diag(s**power) V^T` per matrix by a streaming power iteration.

  This is `scale_by_spectral_power(method="stream")`: one orthogonal
  iteration step per update, the basis carried in the state (see the module
  docstring for the rule). Jit-friendly (no Python-side state) and
  checkpointable (the state is a tree of arrays and `MaskedNode`s).

  Args:
    power: exponent `p` in [0, 1]; may be injected / traced.
    eps: relative cutoff: `s <= eps * max(s)` counts as zero.
    spectrum: `"power"` or `"rank"` (`U diag(i**-p) V^T`).
    rank: number of tracked singular directions per matrix; `None` tracks
      all `min(fan_in, fan_out)`. With a smaller rank the update is the
      spectral power of the best rank-`rank` approximation (once converged).
      Static: list it in `inject_hyperparams`' `static_args`.
    stream_qr: `"qr"` or `"cholesky"` (see `stream_spectral_power`).
    weight_dimension_numbers: which leaves are matrices (see
      `scale_by_spectral_power`); other leaves pass through, with no state.
    distribute: `None` (default: GSPMD partitions the step), or where to run
      the distributed step (a `Mesh`, mesh axis name(s), or a
      `htmuon_jax.sharding.Distribute`): matrices of equal shape and rank
      are spread whole over the devices together with their bases, one
      all-to-all in and one out, and each device runs its matrices' steps
      with no collective; see `matrix_state.update_per_matrix`. The bases
      keep their own sharding in the state: under
      `htmuon_jax.sharding.state_shardings` they are split like their
      matrices (a stack's along the stack, where the distributed step leaves
      them in place), and never gathered.
    stream_side: where the basis lives: `"smaller"` (default: the smaller
      side of each matrix, the cheapest) or `"fan_in"` (the authors'
      orientation: the fan-in side, `V_0` = the first columns of the
      fan_in x fan_in identity); see `stream_spectral_power`.

  Returns:
    An `optax.GradientTransformation` with state `ScaleByStreamState`.

  References:
    Pang et al., `HTMuon: Improving Muon via Heavy-Tailed Spectral
    Correction <https://arxiv.org/abs/2603.10067>`_, 2026 (streaming
    variant of the authors' code).
  """
  check_power(power)
  check_eps(eps)
  method = Stream(rank=rank, qr=stream_qr, side=stream_side)
  method.validate(power, eps, spectrum)
  return methods.scale_by_method(
    method,
    power,
    eps=eps,
    spectrum=spectrum,
    weight_dimension_numbers=weight_dimension_numbers,
    distribute=distribute,
  )
