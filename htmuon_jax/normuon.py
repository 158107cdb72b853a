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

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from htmuon_jax import alias
from htmuon_jax import checks
from htmuon_jax import dimension_numbers as dn
from htmuon_jax import matrix_state
from htmuon_jax import methods
from htmuon_jax import numerics
from htmuon_jax import sharding as sharding_lib
from htmuon_jax.methods import newton_schulz as ns_lib

__all__ = ["ScaleByNorMuonState", "scale_by_normuon", "htnormuon"]


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
  distribute: sharding_lib.DistributeLike = None,
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
      their matrix by all-to-all; no state is gathered.

  Returns:
    An `optax.GradientTransformation` with state `ScaleByNorMuonState`.

  References:
    Li et al., `NorMuon: Making Muon more efficient and scalable
    <https://arxiv.org/abs/2510.05491>`_, 2025.
  """
  checks.check_range(beta2, "beta2", 0.0, 1.0, high_open=True)
  checks.check_range(eps, "eps", 0.0, float("inf"))
  # Validated once, at construction; the normalized form goes down.
  distribute = sharding_lib.as_distribute(distribute)

  def init_fn(params):
    return ScaleByNorMuonState(
      nu=matrix_state.init_per_matrix(
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
    new_updates, nu = matrix_state.update_per_matrix(
      normalize,
      updates,
      state.nu,
      weight_dimension_numbers,
      distribute=distribute,
      # May be traced (injected): arguments, not closed over, so that they
      # can enter the distributed step's shard_map.
      args=(beta2, eps),
    )
    return new_updates, ScaleByNorMuonState(nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def htnormuon(
  learning_rate: optax.ScalarOrSchedule,
  power: chex.Numeric = 0.125,
  ns_coeffs: ns_lib.NSCoeffs = ns_lib.DEFAULT_NS_COEFFS,
  ns_steps: int = 5,
  beta: chex.Numeric = 0.95,
  eps: chex.Numeric = 1e-8,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  weight_decay_mask: Optional[Any] = None,
  mu_dtype: Optional[Any] = None,
  *,
  method: methods.MethodLike = "auto",
  spectral_eps: chex.Numeric = methods.DEFAULT_EPS,
  nesterov: bool = True,
  bias_correction: bool = True,
  adaptive: bool = False,
  preconditioning: ns_lib.Preconditioning = "frobenius",
  adam_b1: chex.Numeric = 0.9,
  adam_b2: chex.Numeric = 0.999,
  adam_eps_root: chex.Numeric = 0.0,
  adam_weight_decay: chex.Numeric = 0.0,
  adam_learning_rate: Optional[optax.ScalarOrSchedule] = None,
  muon_weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  consistent_rms: Optional[chex.Numeric] = None,
  distribute: sharding_lib.DistributeLike = None,
  spectrum: str = "power",
  rank: Optional[int] = None,
  stream_qr: str = "qr",
  interval: Optional[int] = None,
  interval_method: methods.MethodLike = "newton_schulz",
  interval_first: bool = False,
  stream_side: str = "smaller",
  adam_nesterov: Optional[bool] = None,
  precision: str = "auto",
  beta2: chex.Numeric = 0.95,
  normuon_eps: chex.Numeric = 1e-10,
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
    ns_coeffs: Newton-Schulz coefficients or preset (`method="newton_schulz"`).
    ns_steps: Newton-Schulz iterations (`method="newton_schulz"`).
    beta: momentum EMA decay, in [0, 1).
    eps: as in optax: AdamW's epsilon and the Newton-Schulz normalization
      guard.
    weight_decay: decoupled weight decay of the matrix leaves (multiplied by
      the learning rate, as in PyTorch and optax).
    weight_decay_mask: tree or callable of booleans selecting the leaves that
      decay.
    mu_dtype: dtype of the momentum accumulators.
    method: `"auto"`, `"svd"`, `"eigh"`, `"newton_schulz"`, `"polynomial"`,
      `"stream"`, a registered name, or a method object (e.g.
      `htmuon_jax.streaming.Stream(rank=8)`); see `spectral_power`. A method
      object carries its own options (`ns_*`, `preconditioning`, `rank`,
      `stream_qr` then do not apply).
    spectral_eps: relative cutoff for tiny singular values: `s <= spectral_eps
      * s_max` counts as zero.
    nesterov: Nesterov momentum (both branches, as in optax).
    bias_correction: optax's bias-corrected momentum (default); `False` is the
      HTMuon authors' exact rule. See `scale_by_htmuon`.
    adaptive: scale matrix updates by `<N, update>` (optax's flag).
    preconditioning: Newton-Schulz input scaling (`method="newton_schulz"`).
    adam_b1: AdamW's first-moment decay.
    adam_b2: AdamW's second-moment decay.
    adam_eps_root: AdamW's epsilon inside the square root.
    adam_weight_decay: AdamW's weight decay.
    adam_learning_rate: AdamW's learning rate; defaults to `learning_rate`.
    muon_weight_dimension_numbers: which leaves are matrices: `None` (the
      default routing: 2-D leaves and stacked layers of matrices; see
      `resolve_dimension_numbers`), or a tree or callable of
      `MuonDimensionNumbers | None` (`None` sends a leaf to AdamW). Use it
      for conv kernels, attention heads axes and unannotated stacks without
      biases or norms (`flax_layouts.flax_dimension_numbers` builds it).
    consistent_rms: `None` for `sqrt(max(1, fan_out/fan_in))` scaling, or a
      float `c` for `c * sqrt(max(fan_in, fan_out))`.
    distribute: `None` (default), or where to run the distributed spectral
      step and NorMuon's normalization (a `Mesh`, mesh axis name(s), or a
      `htmuon_jax.sharding.Distribute`): matrices of equal shape are spread
      whole over the devices, one all-to-all in and one out for each of the
      two steps, and each device normalizes its matrices next to their
      moments (no state is gathered); see `htmuon_jax.sharding`.
    spectrum: `"power"` (`U diag(s**p) V^T`) or `"rank"`, the authors'
      rank-based `U diag(i**-p) V^T` (methods `"auto"`, `"svd"`, `"eigh"`,
      `"stream"`).
    rank: `method="stream"`: tracked singular directions (`None`: all).
    stream_qr: `method="stream"`: `"qr"` or `"cholesky"`.
    interval: `None`, or `k`: the HT step every `k`-th update (the first
      included), Muon's `U V^T` by `interval_method` otherwise, selected
      inside the jitted step (see `scale_by_htmuon`).
    interval_method: method of the non-HT steps (default Newton-Schulz).
    interval_first: `True` runs the HT steps on updates `1, k + 1, ...`
      instead (the first update included).
    stream_side: `method="stream"`: basis on the `"smaller"` side of each
      matrix (default, cheapest) or the `"fan_in"` side (the authors').
    adam_nesterov: Nesterov flag of the AdamW branch; `None` (default) uses
      `nesterov`, as `optax.contrib.muon` does. The authors' optimizer is
      Nesterov matrices with plain AdamW for the rest: `nesterov=True,
      adam_nesterov=False`.
    precision: `"auto"` (default; see `htmuon`), `"accurate"` or
      `"fast"`: bfloat16-operand,
      float32-accumulated products for `method="polynomial"` and
      `"newton_schulz"` (see `htmuon`).
    beta2: EMA decay of NorMuon's per-unit second moment, in [0, 1).
    normuon_eps: added to `sqrt(v)` before dividing.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Li et al., `NorMuon: Making Muon more efficient and scalable
    <https://arxiv.org/abs/2510.05491>`_, 2025.

    Pang et al., `HTMuon: Improving Muon via Heavy-Tailed Spectral
    Correction <https://arxiv.org/abs/2603.10067>`_, 2026.
  """
  arguments = dict(locals())
  checks.check_range(beta2, "beta2", 0.0, 1.0, high_open=True)
  checks.check_range(normuon_eps, "normuon_eps", 0.0, float("inf"))
  return alias.htmuon_optimizer(
    arguments,
    lambda dims: (
      scale_by_normuon(
        beta2, normuon_eps, weight_dimension_numbers=dims, distribute=distribute
      ),
    ),
  )
