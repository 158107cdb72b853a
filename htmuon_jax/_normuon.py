"""NorMuon's per-output-unit second-moment normalization, and HTNorMuon."""

from typing import Any, NamedTuple

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


@sharding_lib.per_matrix_state("nu")
class ScaleByNorMuonState(NamedTuple):
  """State of `scale_by_normuon`."""

  # Per matrix leaf: float32 (batch, fan_out) second moments; MaskedNode else.
  nu: Any


def frobenius_norm(x: jax.Array) -> jax.Array:
  """`||x||_F` per matrix `(..., 1, 1)`, scaled so squares cannot overflow."""
  x = jnp.abs(x) if jnp.iscomplexobj(x) else x  # same norm, real
  e = numerics.unit_exponents(x, (-2, -1))
  return jnp.ldexp(
    jnp.linalg.norm(jnp.ldexp(x, -e), axis=(-2, -1), keepdims=True), e
  )


def rescale_to_norm(x: jax.Array, target: jax.Array) -> jax.Array:
  """`x * target / ||x||_F` per matrix of a `(..., m, n)` stack (0 for 0)."""
  norm = frobenius_norm(x)
  return x * jnp.where(norm > 0, target / jnp.where(norm > 0, norm, 1.0), 0.0)


def scale_by_normuon(
  beta2: chex.Numeric = 0.95,
  eps: chex.Numeric = 1e-10,
  *,
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  distribute: sharding_lib.ExecutionLike = None,
) -> optax.GradientTransformation:
  """NorMuon's normalization of each output unit by its second moment.

  After a spectral step's `O`: `v <- beta2 v + (1 - beta2) mean_fan_in(O**2)`
  per output unit, `O / (sqrt(v) + eps)` rescaled to `||O||_F` per matrix;
  in float32.

  Args:
    beta2: EMA decay of the second moment, in [0, 1).
    eps: added to `sqrt(v)` before dividing.
    weight_dimension_numbers: which leaves are matrices (see
      `scale_by_spectral_power`); other leaves pass through, with no state.
    distribute: `None` (GSPMD), or where to run it next to the moments,
      which are never gathered; see [Sharding](../sharding.md).

  Returns:
    An `optax.GradientTransformation` with state `ScaleByNorMuonState`.
  """
  checks.check_range(beta2, "beta2", 0.0, 1.0, high_open=True)
  checks.check_nonnegative(eps, "eps")
  execution = sharding_lib.as_execution(distribute)

  def init_fn(params):
    zeros = lambda shape: jnp.zeros((shape[0], shape[2]), jnp.float32)
    nu = grouping.init_per_matrix(zeros, params, weight_dimension_numbers)
    return ScaleByNorMuonState(nu=nu)

  def normalize(
    o: jax.Array, nu: jax.Array, beta2: Any, eps: Any
  ) -> tuple[jax.Array, jax.Array]:
    if o.size == 0:
      return o, nu
    if jnp.iscomplexobj(o):
      # (batch, fan_in, fan_out); complex: the second moment of |o|.
      o = o.astype(numerics.compute_dtype(o.dtype))
      nu = beta2 * nu + (1 - beta2) * jnp.mean(jnp.square(jnp.abs(o)), axis=-2)
      normed = o / (jnp.sqrt(nu)[..., None, :] + eps)
      return rescale_to_norm(
        normed, jnp.linalg.norm(o, axis=(-2, -1), keepdims=True)
      ), nu
    o = o.astype(jnp.float32)  # (batch, fan_in, fan_out)
    # Per unit o = 2^e o' (exact; no over/underflow in squares), nu = 4^e nu':
    # o / (sqrt(nu) + eps) = o' / (sqrt(nu') + eps 2^-e).
    e = numerics.unit_exponents(o, -2)  # (batch, 1, fan_out)
    scaled = jnp.ldexp(o, -e)
    big = jnp.finfo(jnp.float32).max
    nu_scaled = beta2 * jnp.ldexp(nu, -2 * e[..., 0, :]) + (
      1 - beta2
    ) * jnp.mean(scaled * scaled, axis=-2)
    # The stored moment saturates at float32's maximum (units above ~1e19).
    nu_scaled = jnp.minimum(nu_scaled, big)
    normed = scaled / (
      jnp.sqrt(nu_scaled)[..., None, :]
      + jnp.ldexp(jnp.asarray(eps, jnp.float32), -e)
    )
    nu = jnp.minimum(jnp.ldexp(nu_scaled, 2 * e[..., 0, :]), big)
    return rescale_to_norm(normed, frobenius_norm(o)), nu

  def update_fn(updates, state, params=None):
    del params
    new_updates, nu = grouping.update_per_matrix(
      normalize,
      updates,
      state.nu,
      weight_dimension_numbers,
      execution,
      # May be traced (injected): arguments, to enter the shard_map.
      args=(beta2, eps),
    )
    return new_updates, ScaleByNorMuonState(nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


@alias.with_htmuon_keywords
def htnormuon(
  learning_rate: optax.ScalarOrSchedule,
  power: chex.Numeric = 0.125,
  *,
  beta2: chex.Numeric = 0.95,
  normuon_eps: chex.Numeric = 1e-10,
  **keywords: Any,
) -> optax.GradientTransformationExtraArgs:
  """HTNorMuon: HTMuon's spectral step, then NorMuon's unit normalization.

  `O = U diag(s**p) V^T` as in `htmuon`, then `scale_by_normuon` (one second
  moment per output unit) and the shape factor; the rule:
  [Optimizers](../optimizers.md). `power=0` with
  `method="newton_schulz"` is NorMuon.

  Examples:
    >>> import jax.numpy as jnp
    >>> import htmuon_jax
    >>> params = {"w": jnp.zeros((2, 2))}
    >>> opt = htmuon_jax.htnormuon(0.1, power=0.5)
    >>> grads = {"w": jnp.diag(jnp.array([4.0, 1.0]))}
    >>> updates, _ = opt.update(grads, opt.init(params), params)
    >>> # Both output units end with the same norm (HTMuon alone: 2 to 1).
    >>> print(jnp.linalg.norm(updates["w"], axis=0).round(4))
    [0.1928 0.1928]

  Args:
    learning_rate: a scalar or an optax schedule.
    power: spectral exponent `p` in [0, 1].
    beta2: EMA decay of the per-unit second moment, in [0, 1).
    normuon_eps: added to `sqrt(v)` before dividing.
    **keywords: every other keyword of `htmuon`, with its meaning and default;
      `interval=k` runs the HT step on updates `k, 2k, ...`, Newton-Schulz on
      the others, each normalized.
  """
  shared = alias.shared_keywords("htnormuon", power, keywords)
  checks.check_nonnegative(normuon_eps, "normuon_eps")
  normalize = lambda k, dims: (
    scale_by_normuon(
      beta2, normuon_eps, weight_dimension_numbers=dims, distribute=k.distribute
    ),
  )
  return alias.spectral_optimizer(
    learning_rate, shared, alias.htmuon_direction(normalize)
  )
