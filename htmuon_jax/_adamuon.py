"""AdaMuon's pieces, and HT-AdaMuon: AdaMuon with the heavy-tailed correction.

AdaMuon (Si, Zhang, Shen 2025) for a weight matrix with momentum `M`:

    O = NewtonSchulz(sign(M))                      # orthogonalize the sign
    V <- beta2 V + (1 - beta2) O * O                # elementwise, no bias fix
    O' = O / (sqrt(V) + eps)
    O' <- O' * rms * sqrt(m n) / ||O'||_F           # update RMS = rms (0.2)

HT-AdaMuon keeps every step and replaces the orthogonalization by HTMuon's
spectral power of the sign: `O = U diag(s**p) V^T` for
`sign(M) = U diag(s) V^T`. No reference implementation exists; see
`htadamuon` for the reasoning.
"""

import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from htmuon_jax import _alias as alias
from htmuon_jax import _checks as checks
from htmuon_jax import _dimension_numbers as dn
from htmuon_jax import _grouping as grouping
from htmuon_jax import _normuon as normuon
from htmuon_jax import _numerics as numerics
from htmuon_jax import sharding as sharding_lib
from htmuon_jax import _transform as transform


def scale_by_matrix_sign(
  *, weight_dimension_numbers: dn.WeightDimNumOrFn = None
) -> optax.GradientTransformation:
  """`sign(M)` for matrix leaves (AdaMuon's sign step); others unchanged.

  A non-finite entry gives NaN (not `sign(inf) = 1`), so a non-finite
  gradient stays visible to `optax.apply_if_finite` downstream.

  Args:
    weight_dimension_numbers: which leaves are matrices (see
      `scale_by_spectral_power`).

  Returns:
    A stateless `optax.GradientTransformation`.
  """

  def update_fn(updates, state, params=None):
    del params
    dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, updates)
    return dn.map_with_dimension_numbers(
      lambda d, u: u if d is None else _sign(u), dim_tree, updates
    ), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _sign(u: jax.Array) -> jax.Array:
  """`sign(u)`, NaN where `u` is not finite (`sign(inf) = 1` would hide it)."""
  # u - u is 0 where u is finite, NaN where not (no NaN constant: see
  # `spectral.restore_non_finite`).
  return jnp.sign(u) + (u - u)


class ScaleByAdaMuonState(NamedTuple):
  """State of `scale_by_adamuon`."""

  # Per matrix leaf: float32 elementwise second moment in the parameter's own
  # layout (its shape, and its sharding under `sharding.state_shardings`);
  # `optax.MaskedNode()` for other leaves.
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

  Put it after the (spectral) orthogonalization `O` of each matrix:
  `V <- beta2 V + (1 - beta2) O**2`, `O' = O / (sqrt(V) + eps)`, then each
  matrix is scaled to `rms * sqrt(fan_in * fan_out) / ||O'||_F`, so that its
  root-mean-square entry is `rms` (AdaMuon's 0.2 matches AdamW's typical
  update RMS). Computed in float32.

  Args:
    beta2: EMA decay of the second moment, in [0, 1).
    eps: added to `sqrt(V)` before dividing.
    rms: target root-mean-square of each matrix update.
    weight_dimension_numbers: which leaves are matrices (see
      `scale_by_spectral_power`); other leaves pass through, with no state.
    distribute: how the per-matrix work runs (see `htmuon`); `htadamuon`
      passes its `Execution`'s grouping and memory options and keeps this
      elementwise step on the parameters' layout.

  Returns:
    An `optax.GradientTransformation` with state `ScaleByAdaMuonState`.

  References:
    Si, Zhang, Shen, `AdaMuon: Adaptive Muon Optimizer
    <https://arxiv.org/abs/2507.11005>`_, 2025.
  """
  checks.check_range(beta2, "beta2", 0.0, 1.0, high_open=True)
  checks.check_range(eps, "eps", 0.0, float("inf"))
  checks.check_range(rms, "rms", 0.0, float("inf"))

  execution = sharding_lib.as_execution(distribute)

  def init_fn(params):
    dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, params)
    return ScaleByAdaMuonState(
      nu=dn.map_with_dimension_numbers(
        lambda d, p: (
          optax.MaskedNode() if d is None else jnp.zeros(p.shape, jnp.float32)
        ),
        dim_tree,
        params,
      )
    )

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
    nu = dn.map_with_dimension_numbers(
      lambda d, u, v: v if d is None else dn.to_matrices(v, d),
      dim_tree,
      updates,
      state.nu,
    )
    new_updates, nu = grouping.update_per_matrix(
      normalize, updates, nu, dim_tree, execution
    )
    nu = dn.map_with_dimension_numbers(
      lambda d, u, v: v if d is None else dn.from_matrices(v, d, u.shape),
      dim_tree,
      updates,
      nu,
    )
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
  r"""HT-AdaMuon: AdaMuon with HTMuon's spectral power in place of `U V^T`.

  For each weight matrix, with `N` the (Nesterov) momentum of `htmuon`:

  .. math::
    \operatorname{sign}(N) = U \operatorname{diag}(s) V^\top, \quad
    O = U \operatorname{diag}(s^p) V^\top, \quad
    V_2 \leftarrow \beta_2 V_2 + (1 - \beta_2) O \odot O,

  .. math::
    \tilde O = \frac{O}{\sqrt{V_2} + \epsilon}, \quad
    W \leftarrow W - \eta \left( \frac{r \sqrt{mn}}{\lVert \tilde O
      \rVert_F} \tilde O + \lambda W \right),

  with `r = rms` (0.2) and `m x n` the matrix. Other leaves go to AdamW as
  in `htmuon`.

  Design (no reference implementation exists). AdaMuon orthogonalizes
  `sign(N)`, not `N`; HT-AdaMuon keeps that input and replaces only the
  orthogonalization `U V^T` by `U diag(s**p) V^T`, so that:

  * `power=0` is AdaMuon exactly (with `method="newton_schulz"`, its own
    orthogonalization), as `power=0` of `htmuon` is Muon;
  * the sign step keeps its role (bounded entries, robustness to outlier
    gradients) and the HT correction re-weights the directions of the sign
    matrix by their singular values, `O = sign(N) (sign(N)^T
    sign(N))^{(p-1)/2}` on its row space: dominant directions of the
    momentum's sign pattern move more than under AdaMuon, by the factor
    `(s_i / s_j)**p`, as HTMuon does for the momentum itself;
  * the final RMS alignment removes the overall scale `||sign(N)||**p`, so
    only the relative spectrum matters and AdaMuon's learning rates
    (update RMS `rms`) carry over unchanged.

  Applying the HT step to `N` itself (dropping the sign) was rejected: it
  would not reduce to AdaMuon at `power=0`.

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
    beta2: EMA decay of AdaMuon's elementwise second moment, in [0, 1).
    adamuon_eps: added to `sqrt(V_2)` before dividing.
    rms: root-mean-square of each matrix update before the learning rate.
    **keywords: every other keyword of `htmuon` (`HTMuonKeywords`), with
      its default, and these meanings where they differ: `interval=k` runs
      the HT step of `sign(N)` on updates `k, 2k, ...` and Newton-Schulz's
      `U V^T` of it on the others; `adaptive` scales each matrix's final
      update `D` (after the RMS alignment, which would undo it earlier) by
      `<N, D>`; `consistent_rms=c` sets each matrix update's RMS to `c`
      (overriding `rms`; no shape factor is applied either way: the RMS
      alignment fixes the scale); `distribute` distributes only the
      spectral power: the sign before it and AdaMuon's normalization after
      it are elementwise ops and one reduction per matrix, which GSPMD
      partitions on the parameters' own layout.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Si, Zhang, Shen, `AdaMuon: Adaptive Muon Optimizer
    <https://arxiv.org/abs/2507.11005>`_, 2025.

    Pang et al., `HTMuon: Improving Muon via Heavy-Tailed Spectral
    Correction <https://arxiv.org/abs/2603.10067>`_, 2026.
  """
  shared = alias.shared_keywords("htadamuon", power, keywords)
  checks.check_range(adamuon_eps, "adamuon_eps", 0.0, float("inf"))

  def direction(
    k: alias.HTMuonKeywords,
    steps: alias.SpectralSteps,
    dims: dn.WeightDimNumOrFn,
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

    step = spectral_step(k.power, steps.method, k.spectrum)
    if k.interval is not None:
      step = transform.scale_by_interval(
        step, spectral_step(0.0, steps.interval_method), k.interval
      )
    target_rms = rms if k.consistent_rms is None else k.consistent_rms
    normalized: tuple[optax.GradientTransformation, ...] = (
      scale_by_matrix_sign(weight_dimension_numbers=dims),
      step,
      # Elementwise, plus one Frobenius norm per matrix: left to GSPMD on
      # the parameters' layout (see `distribute` above).
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
