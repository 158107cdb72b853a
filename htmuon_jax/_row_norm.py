"""RMNP: row-normalized momentum, the O(mn) alternative to orthogonalization.

RMNP (arXiv 2603.20527, the HTMuon paper's companion) replaces Muon's polar factor
`(M M^T)^(-1/2) M` by the row normalization `diag(M M^T)^(-1/2) M`: each
output unit of the (Nesterov) momentum is scaled to unit Euclidean norm over
its fan_in. With PyTorch's `(out, in)` layout these are rows; with Flax's
`(in, out)` kernels the norm runs over axis 0 (the reduction axes of the
dimension numbers). Tall matrices are not transposed, on purpose.
"""

from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from htmuon_jax import _alias as alias
from htmuon_jax import _checks as checks
from htmuon_jax import _dimension_numbers as dn
from htmuon_jax import _grouping as grouping
from htmuon_jax import _numerics as numerics
from htmuon_jax import sharding as sharding_lib
from htmuon_jax import _transform as transform


def scale_by_row_norm(
  eps: chex.Numeric = 1e-8,
  *,
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  distribute: sharding_lib.ExecutionLike = None,
) -> optax.GradientTransformation:
  """Normalizes each output unit of each matrix update over its fan_in.

  `N_j <- N_j / (||N_j||_2 + eps)`, where `N_j` holds the weights feeding
  output unit `j` (a column of a Flax `(in, out)` kernel; for conv kernels
  and other layouts the reduction axes of `weight_dimension_numbers`).
  Computed in float32 (complex64 for complex updates, normalized by the
  Euclidean norm of the moduli); returns the update's dtype.

  Args:
    eps: added to each norm before dividing (a zero unit stays zero).
    weight_dimension_numbers: which leaves are matrices (see
      `scale_by_spectral_power`); other leaves pass through unchanged.
    distribute: how the per-matrix work runs (see `htmuon`): an
      `htmuon_jax.Execution` for its grouping and memory options; it
      shards with no gather, so spreading it over a mesh is rarely worth
      an all-to-all.

  Returns:
    A stateless `optax.GradientTransformation`.

  References:
    `RMNP: row-normalized momentum (companion paper of HTMuon)
    <https://arxiv.org/abs/2603.20527>`_, ICML 2026.
  """
  checks.check_range(eps, "eps", 0.0, float("inf"))
  execution = sharding_lib.as_execution(distribute)

  def normalize(x: jax.Array) -> jax.Array:
    if x.size == 0:
      return x
    if jnp.iscomplexobj(x):
      # (batch, fan_in, fan_out); complex units are divided by the norm of
      # their moduli.
      x32 = x.astype(numerics.compute_dtype(x.dtype))
      out = x32 / (jnp.linalg.norm(x32, axis=-2, keepdims=True) + eps)
      return out.astype(x.dtype)
    x32 = x.astype(jnp.float32)  # (batch, fan_in, fan_out)
    # Each unit is divided by a power of two 2^e (exact) so its largest entry
    # lies in [0.5, 1): the squares in its norm neither overflow (gradients
    # of 1e19..1e38 gave exactly 0) nor underflow. x / (||x|| + eps) =
    # x' / (||x'|| + eps 2^-e) with x' = x 2^-e.
    e = numerics.unit_exponents(x32, -2)
    scaled = jnp.ldexp(x32, -e)
    eps_scaled = jnp.ldexp(jnp.asarray(eps, jnp.float32), -e)
    out = scaled / (
      jnp.linalg.norm(scaled, axis=-2, keepdims=True) + eps_scaled
    )
    return out.astype(x.dtype)

  def update_fn(updates, state, params=None):
    del params
    new_updates, _ = grouping.update_per_matrix(
      normalize, updates, None, weight_dimension_numbers, execution
    )
    return new_updates, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def rmnp(
  learning_rate: optax.ScalarOrSchedule = 0.02,
  beta: chex.Numeric = 0.95,
  eps: chex.Numeric = 1e-8,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  weight_decay_mask: Optional[Any] = None,
  mu_dtype: Optional[Any] = None,
  *,
  nesterov: bool = True,
  adaptive: bool = False,
  adam_b1: chex.Numeric = 0.9,
  adam_b2: chex.Numeric = 0.999,
  adam_eps_root: chex.Numeric = 0.0,
  adam_weight_decay: chex.Numeric = 0.0,
  adam_learning_rate: Optional[optax.ScalarOrSchedule] = None,
  muon_weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  consistent_rms: Optional[chex.Numeric] = None,
  adam_nesterov: Optional[bool] = None,
  distribute: sharding_lib.ExecutionLike = None,
) -> optax.GradientTransformationExtraArgs:
  r"""RMNP: row-normalized Nesterov momentum for matrices, AdamW for the rest.

  For each weight matrix with gradient `G` (RMNP's own momentum form, a
  plain sum rather than `htmuon`'s EMA; the normalization removes the
  difference in scale):

  .. math::
    B \leftarrow \beta B + G, \quad N = G + \beta B, \quad
    N_{:,j} \leftarrow \frac{N_{:,j}}{\lVert N_{:,j} \rVert_2 + \epsilon},
    \quad W \leftarrow W - \eta (c N + \lambda W),

  with `j` running over output units (the norm is over fan_in, axis 0 of a
  Flax kernel) and `c = sqrt(max(1, fan_out / fan_in))`. Other leaves go to
  AdamW as in `htmuon`. Costs O(mn) per matrix, no matrix products. It
  shards with no gather: GSPMD keeps each matrix on its own layout, and an
  FSDP-sharded fan_in costs one all-reduce of the partial unit norms.

  Examples:
    >>> import jax.numpy as jnp
    >>> import htmuon_jax
    >>> params = {"w": jnp.zeros((2, 2))}
    >>> opt = htmuon_jax.rmnp(0.02)
    >>> grads = {"w": jnp.array([[3.0, 0.0], [4.0, 1.0]])}
    >>> updates, _ = opt.update(grads, opt.init(params), params)
    >>> # Each output unit (column of a Flax kernel) has unit norm, times lr.
    >>> print((updates["w"] / -0.02).round(3))
    [[0.6 0. ]
     [0.8 1. ]]

  Args:
    learning_rate: a scalar or an optax schedule; the paper's default 0.02.
    beta: momentum decay, in [0, 1); the paper uses 0.95.
    eps: AdamW's epsilon, and added to each unit's norm.
    weight_decay: decoupled weight decay of the matrix leaves (multiplied by
      the learning rate).
    weight_decay_mask: tree or callable of booleans selecting leaves that
      decay.
    mu_dtype: dtype of the momentum accumulators.
    nesterov: Nesterov momentum `N = G + beta B` (default, as the paper);
      `False` uses `N = B`. Also AdamW's Nesterov flag, as in `htmuon`.
    adaptive: scale each normalized update `D` by `<N, D>` before the shape
      factor (optax's `adaptive` flag; `transform.scale_by_dual_norm`).
    adam_b1: AdamW's first-moment decay.
    adam_b2: AdamW's second-moment decay.
    adam_eps_root: AdamW's epsilon inside the square root.
    adam_weight_decay: AdamW's weight decay.
    adam_learning_rate: AdamW's learning rate; defaults to `learning_rate`.
    muon_weight_dimension_numbers: which leaves are matrices, as in `htmuon`
      (`None`: the default routing, stacked layers included; conv kernels
      take `MuonDimensionNumbers`).
    consistent_rms: `None` for `sqrt(max(1, fan_out/fan_in))` scaling, or a
      float `c` for `c * sqrt(max(fan_in, fan_out))`.
    adam_nesterov: AdamW's Nesterov flag; `None` (default) uses `nesterov`.
    distribute: how the matrix work runs (see `htmuon`; an
      `htmuon_jax.Execution` sets the grouping and memory options).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    `RMNP: row-normalized momentum (companion paper of HTMuon)
    <https://arxiv.org/abs/2603.20527>`_, ICML 2026.
  """
  checks.check_learning_rates(learning_rate, adam_learning_rate)
  checks.check_range(beta, "beta", 0.0, 1.0, high_open=True)

  execution = sharding_lib.as_execution(distribute)

  def direction(
    dims: dn.WeightDimNumOrFn,
  ) -> tuple[optax.GradientTransformation, ...]:
    normalize = scale_by_row_norm(
      eps, weight_dimension_numbers=dims, distribute=execution
    )
    if adaptive:
      normalize = transform.scale_by_dual_norm(
        normalize, weight_dimension_numbers=dims
      )
    return (
      optax.trace(beta, nesterov=nesterov, accumulator_dtype=mu_dtype),
      normalize,
      transform.scale_by_shape(
        weight_dimension_numbers=dims, consistent_rms=consistent_rms
      ),
    )

  return alias.matrix_optimizer(
    direction,
    learning_rate,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    eps=eps,
    mu_dtype=mu_dtype,
    nesterov=nesterov,
    adam_b1=adam_b1,
    adam_b2=adam_b2,
    adam_eps_root=adam_eps_root,
    adam_weight_decay=adam_weight_decay,
    adam_learning_rate=adam_learning_rate,
    adam_nesterov=adam_nesterov,
    muon_weight_dimension_numbers=muon_weight_dimension_numbers,
    execution=execution,
  )
