"""AdaMuon's pieces, and HT-AdaMuon: AdaMuon with HTMuon's spectral power."""

import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from htmuon_jax import _alias as alias
from htmuon_jax import _checks as checks
from htmuon_jax import _layouts as dn
from htmuon_jax import _grouping as grouping
from htmuon_jax import _normuon as normuon
from htmuon_jax import _numerics as numerics
from htmuon_jax import sharding as sharding_lib
from htmuon_jax import _transform as transform


def scale_by_matrix_sign(
  *, weight_dimension_numbers: dn.WeightDimNumOrFn = None
) -> optax.GradientTransformation:
  """`sign(M)` of matrix leaves (AdaMuon's first step); NaN where not finite."""

  def update_fn(updates, state, params=None):
    del params
    dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, updates)
    # NaN where not finite (`u - u`; sign(inf) = 1 would hide it).
    sign = lambda d, u: u if d is None else jnp.sign(u) + (u - u)
    return dn.map_with_dimension_numbers(sign, dim_tree, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


class ScaleByAdaMuonState(NamedTuple):
  """State of `scale_by_adamuon`."""

  # Per matrix leaf: float32 second moments shaped (and, under
  # `state_shardings`, sharded) as the parameter; MaskedNode else.
  nu: Any


def scale_by_adamuon(
  beta2: chex.Numeric = 0.95,
  eps: chex.Numeric = 1e-8,
  rms: chex.Numeric = 0.2,
  *,
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  distribute: sharding_lib.ExecutionLike = None,
) -> optax.GradientTransformation:
  """AdaMuon's elementwise second-moment normalization and RMS alignment.

  After the orthogonalization `O`: `V <- beta2 V + (1 - beta2) O**2`,
  `O / (sqrt(V) + eps)` scaled to a root-mean-square of `rms`; in float32.

  Args:
    beta2: EMA decay of the second moment, in [0, 1).
    eps: added to `sqrt(V)` before dividing.
    rms: target root-mean-square of each matrix update.
    weight_dimension_numbers: which leaves are matrices; others pass through.
    distribute: how the per-matrix work runs (see `htmuon`).

  Returns:
    An `optax.GradientTransformation` with state `ScaleByAdaMuonState`.
  """
  checks.check_range(beta2, "beta2", 0.0, 1.0, high_open=True)
  checks.check_nonnegative(eps, "eps")
  checks.check_nonnegative(rms, "rms")
  execution = sharding_lib.as_execution(distribute)

  def init_fn(params):
    dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, params)
    zeros = lambda d, p: (
      optax.MaskedNode() if d is None else jnp.zeros(p.shape, jnp.float32)
    )
    nu = dn.map_with_dimension_numbers(zeros, dim_tree, params)
    return ScaleByAdaMuonState(nu)

  def normalize(o: jax.Array, nu: jax.Array) -> tuple[jax.Array, jax.Array]:
    if o.size == 0:
      return o, nu
    # (batch, fan_in, fan_out); complex: the second moment of |o|.
    o = o.astype(numerics.compute_dtype(o.dtype))
    nu = beta2 * nu + (1 - beta2) * jnp.square(jnp.abs(o))
    normed = o / (jnp.sqrt(nu) + eps)
    target = rms * (o.shape[-2] * o.shape[-1]) ** 0.5
    return normuon.rescale_to_norm(normed, target), nu

  def update_fn(updates, state, params=None):
    del params
    dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, updates)
    # Stored like the parameter, computed on its (batch, fan_in, fan_out)
    # matrices: the same transpose and reshape as the update's.
    to_m = lambda d, u, v: v if d is None else dn.to_matrices(v, d)
    nu = dn.map_with_dimension_numbers(to_m, dim_tree, updates, state.nu)
    new_updates, nu = grouping.update_per_matrix(
      normalize, updates, nu, dim_tree, execution
    )
    from_m = lambda d, u, v: v if d is None else dn.from_matrices(v, d, u.shape)
    nu = dn.map_with_dimension_numbers(from_m, dim_tree, updates, nu)
    return new_updates, ScaleByAdaMuonState(nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


@alias.with_htmuon_keywords
def htadamuon(
  learning_rate: optax.ScalarOrSchedule,
  power: chex.Numeric = 0.125,
  *,
  beta2: chex.Numeric = 0.95,
  adamuon_eps: chex.Numeric = 1e-8,
  rms: chex.Numeric = 0.2,
  **keywords: Any,
) -> optax.GradientTransformationExtraArgs:
  """HT-AdaMuon: AdaMuon with HTMuon's spectral power in place of `U V^T`.

  `sign(N) = U diag(s) V^T` of `htmuon`'s momentum `N`, `O = U diag(s**p)
  V^T`, then `scale_by_adamuon` (update RMS `rms`); the rule and its design:
  [Optimizers](../optimizers.md#ht-adamuons-design). `power=0` with
  `method="newton_schulz"` is AdaMuon.

  Examples:
    >>> import jax.numpy as jnp
    >>> import htmuon_jax
    >>> params = {"w": jnp.zeros((2, 2))}
    >>> opt = htmuon_jax.htadamuon(0.1, rms=0.2)
    >>> grads = {"w": jnp.array([[3.0, 0.5], [4.0, 1.0]])}
    >>> updates, _ = opt.update(grads, opt.init(params), params)
    >>> # The update's RMS is rms * learning_rate.
    >>> print(jnp.sqrt(jnp.mean(updates["w"] ** 2)).round(4))
    0.02

  Args:
    learning_rate: a scalar or an optax schedule.
    power: spectral exponent `p` in [0, 1].
    beta2: EMA decay of the elementwise second moment, in [0, 1).
    adamuon_eps: added to `sqrt(V)` before dividing.
    rms: the root-mean-square of each matrix update.
    **keywords: every other keyword of `htmuon`, with its default; `interval=k`
      runs the HT step of `sign(N)` on updates `k, 2k, ...`, Newton-Schulz on
      the others; `adaptive` scales the final update; `consistent_rms`
      overrides `rms` (no shape factor); `distribute` covers the spectral
      power only.
  """
  shared = alias.shared_keywords("htadamuon", power, keywords)
  checks.check_nonnegative(adamuon_eps, "adamuon_eps")

  def direction(
    k: alias.HTMuonKeywords, dims: dn.WeightDimNumOrFn
  ) -> tuple[optax.GradientTransformation, ...]:
    def spectral_step(p, method, spectrum="power"):
      return transform.scale_by_spectral_power(
        p,
        method=method,
        eps=k.spectral_eps,
        spectrum=spectrum,
        weight_dimension_numbers=dims,
        distribute=k.distribute,
      )

    step = spectral_step(k.power, k.spectral_method(), k.spectrum)
    if k.interval is not None:
      step = transform.scale_by_interval(
        step, spectral_step(0.0, k.spectral_method("newton_schulz")), k.interval
      )
    target_rms = rms if k.consistent_rms is None else k.consistent_rms
    normalized: tuple[optax.GradientTransformation, ...] = (
      scale_by_matrix_sign(weight_dimension_numbers=dims),
      step,
      scale_by_adamuon(
        beta2,
        adamuon_eps,
        target_rms,
        weight_dimension_numbers=dims,
        # Elementwise: on the parameters' layout, with the grouping options.
        distribute=dataclasses.replace(
          sharding_lib.as_execution(k.distribute), distribute=None
        ),
      ),
    )
    if k.adaptive:
      normalized = (
        transform.scale_by_dual_norm(
          optax.chain(*normalized), weight_dimension_numbers=dims
        ),
      )
    momentum = transform.scale_by_momentum(
      k.beta, nesterov=k.nesterov, mu_dtype=k.mu_dtype
    )
    return (momentum, *normalized)

  return alias.spectral_optimizer(learning_rate, shared, direction)
