"""NorMuon's per-output-unit second-moment normalization, and HTNorMuon.

NorMuon (Li et al. 2025) follows Muon's orthogonalization with an Adam-like
normalization of each output unit (a row of a PyTorch `(out, in)` weight, a
column of a Flax `(in, out)` kernel). With `O` the spectral step's output
(`U V^T` for NorMuon, `U diag(s**p) V^T` for HTNorMuon):

    v <- beta2 v + (1 - beta2) mean_over_fan_in(O * O)   # one v per output unit
    O' = O / (sqrt(v) + eps)
    O' <- O' * ||O||_F / ||O'||_F                         # per matrix

followed in the optimizers by the usual shape factor and learning rate.
"""

from typing import Any, NamedTuple

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


@sharding_lib.per_matrix_state("nu")
class ScaleByNorMuonState(NamedTuple):
  """State of `scale_by_normuon`."""

  # Per matrix leaf: float32 (batch, fan_out), the second moment of each
  # output unit; `optax.MaskedNode()` for other leaves.
  nu: Any


def frobenius_norm(x: jax.Array) -> jax.Array:
  """`||x||_F` per matrix `(..., 1, 1)`, free of overflow and underflow.

  The matrix is divided by a power of two (exact) before squaring: a plain
  norm of 1e-30 entries is 0 and of 1e20 entries Inf in float32.
  """
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

  Put it after a spectral step (`scale_by_htmuon`): each output unit is
  divided by the root of an EMA of its mean square over fan_in (the
  reduction axes: axis 0 of a Flax kernel), then each matrix is rescaled to
  its Frobenius norm before the normalization, so only the relative sizes of
  the output units change. Computed in float32.

  Args:
    beta2: EMA decay of the second moment, in [0, 1).
    eps: added to `sqrt(v)` before dividing.
    weight_dimension_numbers: which leaves are matrices (see
      `scale_by_spectral_power`); other leaves pass through, with no state.
    distribute: `None` (default: GSPMD partitions the normalization on the
      updates' layout, which under FSDP all-reduces the partial mean squares
      and norms and all-gathers the moments), or where to run it as
      per-matrix work (see `htmuon_jax.sharding`): each device normalizes
      whole matrices next to their moments, which stay where
      `state_shardings` stored them (split along a stack) or travel with
      their matrix by all-to-all; no state is gathered. An `Execution`
      also sets the grouping and memory options.

  Returns:
    An `optax.GradientTransformation` with state `ScaleByNorMuonState`.

  References:
    Li et al., `NorMuon: Making Muon more efficient and scalable
    <https://arxiv.org/abs/2510.05491>`_, 2025.
  """
  checks.check_range(beta2, "beta2", 0.0, 1.0, high_open=True)
  checks.check_range(eps, "eps", 0.0, float("inf"))
  # Validated once, at construction; the normalized form goes down.
  execution = sharding_lib.as_execution(distribute)

  def init_fn(params):
    return ScaleByNorMuonState(
      nu=grouping.init_per_matrix(
        lambda shape: jnp.zeros((shape[0], shape[2]), jnp.float32),
        params,
        weight_dimension_numbers,
      )
    )

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
    # Each output unit is divided by a power of two 2^e (exact) so that its
    # squares neither overflow nor underflow; with o = 2^e o' and
    # nu = 4^e nu', o / (sqrt(nu) + eps) = o' / (sqrt(nu') + eps 2^-e).
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
      # May be traced (injected): arguments, not closed over, so that they
      # can enter the distributed step's shard_map.
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
  r"""HTNorMuon: HTMuon's spectral step, then NorMuon's unit normalization.

  For each weight matrix, with `N` HTMuon's Nesterov momentum and
  `O = U diag(s**p) V^T` its spectral power (`N = U diag(s) V^T`):

  .. math::
    v \leftarrow \beta_2 v + (1 - \beta_2)\, \mathrm{mean}_{\text{fan\_in}}
      (O \odot O), \quad
    O' = \frac{\lVert O \rVert_F}{\lVert \tilde O \rVert_F} \tilde O, \;
    \tilde O = \frac{O}{\sqrt{v} + \epsilon}, \quad
    W \leftarrow W - \eta (c\, O' + \lambda W),

  with one `v` per output unit and `c = sqrt(max(1, fan_out / fan_in))`.
  `power=0` is NorMuon (exactly, with `method="newton_schulz"`, NorMuon's
  own orthogonalization). Other leaves go to AdamW as in `htmuon`.

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
    power: spectral exponent `p` in [0, 1]; the paper uses 0.125.
    beta2: EMA decay of NorMuon's per-unit second moment, in [0, 1).
    normuon_eps: added to `sqrt(v)` before dividing.
    **keywords: every other keyword of `htmuon`, with its meaning and
      default (`HTMuonKeywords`): e.g. `interval=k` runs the HT step on
      updates `k, 2k, ...` and Muon's Newton-Schulz on the others, each
      followed by the normalization. With `distribute`, NorMuon's
      normalization runs distributed too: each device normalizes its
      matrices next to their moments (no state is gathered).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Li et al., `NorMuon: Making Muon more efficient and scalable
    <https://arxiv.org/abs/2510.05491>`_, 2025.

    Pang et al., `HTMuon: Improving Muon via Heavy-Tailed Spectral
    Correction <https://arxiv.org/abs/2603.10067>`_, 2026.
  """
  shared = alias.shared_keywords("htnormuon", power, keywords)
  checks.check_range(beta2, "beta2", 0.0, 1.0, high_open=True)
  checks.check_range(normuon_eps, "normuon_eps", 0.0, float("inf"))
  normalize = lambda k, dims: (
    scale_by_normuon(
      beta2, normuon_eps, weight_dimension_numbers=dims, distribute=k.distribute
    ),
  )
  return alias.spectral_optimizer(
    learning_rate, shared, alias.htmuon_direction(normalize)
  )
