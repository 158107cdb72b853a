"""RMNP: row-normalized momentum, the O(mn) alternative to orthogonalization."""

from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from htmuon_jax import _alias as alias
from htmuon_jax import _checks as checks
from htmuon_jax import _layouts as dn
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
  """`N_j / (||N_j||_2 + eps)` for each output unit `j` of each matrix update.

  The norm runs over fan_in (a column of a Flax kernel), in float32
  (complex: the norm of the moduli).

  Args:
    eps: added to each norm before dividing.
    weight_dimension_numbers: which leaves are matrices; others pass through.
    distribute: how the per-matrix work runs (see `htmuon`).

  Returns:
    A stateless `optax.GradientTransformation`.
  """
  checks.check_nonnegative(eps, "eps")
  execution = sharding_lib.as_execution(distribute)

  def normalize(x: jax.Array) -> jax.Array:
    if x.size == 0:
      return x
    if jnp.iscomplexobj(x):
      x32 = x.astype(numerics.compute_dtype(x.dtype))
      out = x32 / (jnp.linalg.norm(x32, axis=-2, keepdims=True) + eps)
      return out.astype(x.dtype)
    x32 = x.astype(jnp.float32)  # (batch, fan_in, fan_out)
    # Per unit x' = x 2^-e (exact; no over/underflow in squares):
    # x / (||x|| + eps) = x' / (||x'|| + eps 2^-e).
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
  """RMNP: row-normalized Nesterov momentum for matrices, AdamW for the rest.

  `B <- beta B + G`, `N = G + beta B`, then `scale_by_row_norm` (each output
  unit to unit norm over fan_in) and the shape factor: O(mn) per matrix, no
  gather when sharded. Keywords shared with `htmuon` have its meanings.

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
    learning_rate: a scalar or an optax schedule; the paper uses 0.02.
    beta: momentum decay, in [0, 1); the paper uses 0.95.
    eps: AdamW's epsilon, and added to each unit's norm.
    weight_decay: as in `htmuon`.
    weight_decay_mask: as in `htmuon`.
    mu_dtype: as in `htmuon`.
    nesterov: `N = G + beta B` (default), else `N = B`; AdamW's flag too.
    adaptive: scale each normalized update `D` by `<N, D>`.
    adam_b1: as in `htmuon`.
    adam_b2: as in `htmuon`.
    adam_eps_root: as in `htmuon`.
    adam_weight_decay: as in `htmuon`.
    adam_learning_rate: as in `htmuon`.
    muon_weight_dimension_numbers: as in `htmuon`.
    consistent_rms: as in `htmuon`.
    adam_nesterov: AdamW's Nesterov flag; `None` uses `nesterov`.
    distribute: as in `htmuon` (spreading it rarely pays).
  """
  k = alias.HTMuonKeywords(
    beta=beta,
    eps=eps,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    mu_dtype=mu_dtype,
    nesterov=nesterov,
    adaptive=adaptive,
    adam_b1=adam_b1,
    adam_b2=adam_b2,
    adam_eps_root=adam_eps_root,
    adam_weight_decay=adam_weight_decay,
    adam_learning_rate=adam_learning_rate,
    muon_weight_dimension_numbers=muon_weight_dimension_numbers,
    consistent_rms=consistent_rms,
    distribute=distribute,
  )
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

  return alias.matrix_optimizer(direction, learning_rate, k, adam_nesterov)
