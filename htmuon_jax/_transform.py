"""`spectral_power` and HTMuon's update as composable optax transformations:
each rule written once; `scale_by_htmuon` composes them in one state."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from htmuon_jax import _checks as checks
from htmuon_jax import _layouts as dn
from htmuon_jax import _grouping as grouping
from htmuon_jax import methods
from htmuon_jax import _numerics as numerics
from htmuon_jax import sharding as sharding_lib
from htmuon_jax.methods import _newton_schulz as ns_lib


def _method(
  method: methods.MethodLike, power: Any, eps: Any, spectrum: str
) -> methods.SpectralMethod:
  """The method object, with `power` in [0, 1] and `eps` in [0, 1) checked."""
  checks.check_range(power, "power", 0.0, 1.0)
  checks.check_range(eps, "eps", 0.0, 1.0, high_open=True)
  m = methods.get_method(method)
  m.validate(power, eps, spectrum)
  return m


def spectral_power(
  x: jax.Array,
  power: Any,
  *,
  method: methods.MethodLike = "auto",
  eps: Any = methods.DEFAULT_EPS,
  spectrum: str = "power",
) -> jax.Array:
  """Returns `U diag(s**power) V^T` for the last two axes of `x`.

  Singular values `s <= eps * s_max` count as zero; each method's accuracy:
  [Reliability](../reliability.md#accuracy-of-the-methods).

  Examples:
    >>> import jax.numpy as jnp
    >>> from htmuon_jax import spectral_power
    >>> x = jnp.diag(jnp.array([16.0, 1.0]))
    >>> print(jnp.diag(spectral_power(x, 0.25, method="svd")).round(4))
    [2. 1.]

  Args:
    x: array `(..., m, n)`; leading axes are a batch of matrices.
    power: exponent `p` in [0, 1]; may be traced for `"svd"` and `"eigh"`.
    method: a registered name (`"auto"`, `"svd"`, `"eigh"`,
      `"newton_schulz"` (power 0), `"polynomial"`, `"express"`, ...) or a
      stateless method object with its options.
    eps: relative cutoff: singular values `s <= eps * s_max` count as zero.
    spectrum: `"power"`, or `"rank"` for the authors' `U diag(i**-power) V^T`
      (methods that order the singular values).

  Returns:
    An array with the shape and dtype of `x` (`V^H` for complex `x`).

  Raises:
    ValueError: for arguments out of range, a method that cannot take them
      or is stateful, or an `x` of rank < 2 or not floating point.
  """
  m = methods.check_method(_method(method, power, eps, spectrum), power)
  if x.ndim < 2:
    raise ValueError(
      f"x: spectral_power needs an array of rank >= 2, got shape {x.shape}."
    )
  return methods.run_method(m, x, None, power, eps, spectrum)[0]


def scale_by_spectral_power(
  power: chex.Numeric = 0.125,
  *,
  method: methods.MethodLike = "auto",
  eps: chex.Numeric = methods.DEFAULT_EPS,
  spectrum: str = "power",
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  distribute: sharding_lib.ExecutionLike = None,
) -> optax.GradientTransformation:
  """Replaces each matrix update `M = U S V^T` by `U S**power V^T`.

  Args:
    power: exponent `p` in [0, 1] (`0`: Muon's `U V^T`; `1`: identity).
    method: as in `spectral_power`, or a stateful one (`"stream"`).
    eps: relative cutoff (see `spectral_power`).
    spectrum: `"power"` or `"rank"` (see `spectral_power`).
    weight_dimension_numbers: `None` (the default routing), a
      `MuonDimensionNumbers`, a prefix tree of them (`None`: pass through) or
      a callable returning one; see [Routing](../routing.md).
    distribute: `None` (GSPMD), where to spread whole matrices (a `Mesh`,
      axis name(s), a `sharding.Distribute`) or an `htmuon_jax.Execution`;
      see [Sharding](../sharding.md).

  Returns:
    An `optax.GradientTransformation` (a stateful method's `state_type`).
  """
  m = _method(method, power, eps, spectrum)
  m.resolve(power, eps, spectrum).prepare(power, eps)  # never in a jitted step
  execution = sharding_lib.as_execution(distribute)
  stateful = m.stateful

  def run(x, state, power, eps):
    out = methods.run_method(m, x, state, power, eps, spectrum)
    return out if stateful else out[0]

  def init_fn(params):
    if not stateful:
      return optax.EmptyState()
    return m.state_type(
      grouping.init_per_matrix(m.init, params, weight_dimension_numbers)
    )

  def update_fn(updates, state, params=None):
    methods.check_state(m, state, updates, init_fn if stateful else None)
    # Stateless: U f(S) V^T commutes with transposition, so tall and wide
    # matrices of transposed shapes can share a distributed group.
    new_updates, new_state = grouping.update_per_matrix(
      run if stateful else lambda x, power, eps: run(x, None, power, eps),
      updates,
      state[0] if stateful else None,
      weight_dimension_numbers,
      execution,
      args=(power, eps),
      transpose_equivariant=not stateful,
    )
    return new_updates, m.state_type(new_state) if stateful else state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_shape(
  *,
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  consistent_rms: Optional[chex.Numeric] = None,
) -> optax.GradientTransformation:
  """Scales matrix updates by a factor of their shape, as Muon does.

  Args:
    weight_dimension_numbers: which leaves are matrices (see
      `scale_by_spectral_power`).
    consistent_rms: `None` for `sqrt(max(1, fan_out / fan_in))`, or `c` for
      `c * sqrt(max(fan_in, fan_out))` (`0.2` matches AdamW's update RMS).

  Returns:
    A stateless `optax.GradientTransformation`; ValueError for a negative
    `consistent_rms`.
  """
  if consistent_rms is not None:
    checks.check_nonnegative(consistent_rms, "consistent_rms")

  def scale(d: Any, u: jax.Array) -> jax.Array:
    if d is None or u.size == 0:
      return u
    fan_in, fan_out = dn.fan_in_fan_out(u.shape, d)
    if consistent_rms is None:
      factor = max(1.0, fan_out / fan_in) ** 0.5
    else:
      factor = consistent_rms * max(fan_in, fan_out) ** 0.5
    return (factor * u).astype(u.dtype)

  def update_fn(updates, state, params=None):
    dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, updates)
    return dn.map_with_dimension_numbers(scale, dim_tree, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


class ScaleByIntervalState(NamedTuple):
  """State of `scale_by_interval`."""

  count: jax.Array  # type: ignore[assignment]  # int32: updates so far.
  inner: optax.OptState  # State of the every-k-th-update transformation.


def _interval_rule(
  every: optax.GradientTransformation,
  otherwise: Optional[optax.GradientTransformation],
  interval: Optional[chex.Numeric],
  interval_first: bool,
) -> Any:
  """`step(count, updates, inner, params)`: the interval rule, written once."""
  checks.check_interval(interval)
  if interval is None:
    return lambda count, u, inner, params: every.update(u, inner, params)
  offset = 0 if interval_first else 1
  traced = checks.concrete_scalar(interval, "interval") is None

  def step(count, updates, inner, params):
    def other(u, inner):
      assert otherwise is not None
      return otherwise.update(u, optax.EmptyState(), params)[0], inner

    k: Any = interval
    if traced:  # cannot raise under jit: NaN updates, `every`'s state kept
      valid: Any = (interval >= 1) & (interval == jnp.floor(interval))
      k = jnp.where(valid, interval, 1)
    new_updates, new_inner = jax.lax.cond(
      (count + offset) % k == 0,
      lambda u, inner: every.update(u, inner, params),
      other,
      updates,
      inner,
    )
    if traced:
      new_updates = jax.tree.map(
        lambda u: numerics.restore_non_finite(u, valid), new_updates
      )
      new_inner = jax.tree.map(
        lambda new, old: jnp.where(valid, new, old), new_inner, inner
      )
    return new_updates, new_inner

  return step


def scale_by_interval(
  every: optax.GradientTransformation,
  otherwise: optax.GradientTransformation,
  interval: chex.Numeric,
  *,
  interval_first: bool = False,
) -> optax.GradientTransformation:
  """`every` on updates `k, 2k, ...` (`1, k + 1, ...` with `interval_first`),
  stateless `otherwise` on the others, by `lax.cond` (`k` may be injected;
  an invalid injected one gives NaN updates)."""
  step = _interval_rule(every, otherwise, interval, interval_first)

  def init_fn(params):
    return ScaleByIntervalState(jnp.zeros([], jnp.int32), every.init(params))

  def update_fn(updates, state, params=None):
    new_updates, inner = step(state.count, updates, state.inner, params)
    count = optax.safe_increment(state.count)
    return new_updates, ScaleByIntervalState(count, inner)

  return optax.GradientTransformation(init_fn, update_fn)


def _dual_norm(weight_dimension_numbers: Any, n: Any, d: Any) -> Any:
  """`<n, d> d` per matrix leaf, `d` for the others."""
  dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, n)
  scale = lambda dims, n, o: o if dims is None else jnp.sum(n.conj() * o) * o
  return dn.map_with_dimension_numbers(scale, dim_tree, n, d)


def scale_by_dual_norm(
  inner: optax.GradientTransformation,
  *,
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
) -> optax.GradientTransformation:
  """`<n, d> d` per matrix leaf, `d` being `inner`'s update of `n`
  (`optax.contrib.muon`'s `adaptive` rule)."""

  def update_fn(updates, state, params=None):
    new_updates, state = inner.update(updates, state, params)
    return _dual_norm(weight_dimension_numbers, updates, new_updates), state

  return optax.GradientTransformation(inner.init, update_fn)


class ScaleByHTMuonState(NamedTuple):
  """State of `scale_by_htmuon` (and of `scale_by_momentum`)."""

  count: jax.Array  # type: ignore[assignment]  # int32: updates so far.
  mu: optax.Updates  # EMA of the gradients.
  # State of the spectral step: empty, or the basis of method="stream".
  spectral: optax.OptState = optax.EmptyState()


def scale_by_momentum(
  beta: chex.Numeric = 0.95,
  *,
  nesterov: bool = True,
  bias_correction: bool = True,
  mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  """HTMuon's momentum: the EMA `m <- beta m + (1 - beta) g` and its look-ahead.

  Args:
    beta: EMA decay, in [0, 1).
    nesterov: return `n = beta m + (1 - beta) g` (else `m`).
    bias_correction: divide by `1 - beta**t` as `optax.contrib.muon`;
      `False` is the HTMuon authors' rule.
    mu_dtype: dtype of the accumulator (`None`: the params').

  Returns:
    An `optax.GradientTransformation` with state `ScaleByHTMuonState`.
  """
  checks.check_range(beta, "beta", 0.0, 1.0, high_open=True)
  mu_dtype = checks.check_mu_dtype(mu_dtype)
  look_ahead = lambda m, g: beta * m + (1 - beta) * g

  def init_fn(params):
    zeros = optax.tree.zeros_like(params, dtype=mu_dtype)
    return ScaleByHTMuonState(count=jnp.zeros([], jnp.int32), mu=zeros)

  def update_fn(updates, state, params=None):
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count = optax.safe_increment(state.count)
    if not bias_correction:
      mu_hat = jax.tree.map(look_ahead, mu, updates) if nesterov else mu
    elif nesterov:
      mu_hat = jax.tree.map(
        look_ahead,
        optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
        optax.tree.bias_correction(updates, beta, count),
      )
    else:
      mu_hat = optax.tree.bias_correction(mu, beta, count)
    return mu_hat, state._replace(count=count, mu=optax.tree.cast(mu, mu_dtype))

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_htmuon(
  power: chex.Numeric = 0.125,
  beta: chex.Numeric = 0.95,
  *,
  nesterov: bool = True,
  bias_correction: bool = True,
  mu_dtype: Optional[Any] = None,
  method: methods.MethodLike = "auto",
  eps: chex.Numeric = methods.DEFAULT_EPS,
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  adaptive: bool = False,
  spectrum: str = "power",
  interval: Optional[int] = None,
  interval_method: methods.MethodLike = "newton_schulz",
  ns_coeffs: ns_lib.NSCoeffs = ns_lib.DEFAULT_NS_COEFFS,
  ns_steps: int = 5,
  ns_preconditioning: ns_lib.Preconditioning = "frobenius",
  ns_eps: float = 1e-8,
  distribute: sharding_lib.ExecutionLike = None,
  interval_first: bool = False,
) -> optax.GradientTransformation:
  """HTMuon's direction: momentum, then `U diag(s**power) V^T` per matrix.

  `scale_by_momentum`, `scale_by_spectral_power` (as `scale_by_interval`
  with `interval`) and `scale_by_dual_norm` (with `adaptive`) in one state.

  Args:
    power: exponent `p` in [0, 1]; the paper uses 0.125.
    beta: EMA decay of the momentum, in [0, 1).
    nesterov: see `scale_by_momentum`.
    bias_correction: see `scale_by_momentum`.
    mu_dtype: dtype of the momentum accumulator.
    method: see `scale_by_spectral_power`.
    eps: relative cutoff for tiny singular values.
    weight_dimension_numbers: see `scale_by_spectral_power`; other leaves
      receive the momentum.
    adaptive: scale each matrix update by `<n, update>`.
    spectrum: `"power"` or `"rank"`.
    interval: `None`, or `k`: the HT step on every `k`-th update,
      `interval_method` on the others (see `scale_by_interval`).
    interval_method: a stateless method (default Newton-Schulz).
    ns_coeffs: Newton-Schulz coefficients of a method given by name.
    ns_steps: Newton-Schulz iterations of a method given by name.
    ns_preconditioning: Newton-Schulz input scaling of a method given by name.
    ns_eps: Newton-Schulz normalization guard of a method given by name.
    distribute: see `scale_by_spectral_power`.
    interval_first: see `scale_by_interval`.

  Returns:
    An `optax.GradientTransformation` with state `ScaleByHTMuonState`.
  """
  try:
    stateful = methods.get_method(interval_method).stateful
  except ValueError:
    stateful = None
  if stateful is not False:
    raise ValueError(
      "interval_method: expected a stateless method (one of "
      f"{methods.method_names(stateful=False)} or a method object), got "
      f"{interval_method!r}."
    )
  if not isinstance(adaptive, (bool, np.bool_)):
    raise ValueError(f"adaptive must be a bool, got {adaptive!r}.")
  momentum = scale_by_momentum(
    beta, nesterov=nesterov, bias_correction=bias_correction, mu_dtype=mu_dtype
  )
  ns = dict(ns_coeffs=ns_coeffs, ns_steps=ns_steps, ns_eps=ns_eps)

  def spectral_step(p, m, spectrum="power"):
    return scale_by_spectral_power(
      p,
      method=methods.from_keywords(m, preconditioning=ns_preconditioning, **ns),
      eps=eps,
      spectrum=spectrum,
      weight_dimension_numbers=weight_dimension_numbers,
      distribute=distribute,
    )

  ht_step = spectral_step(power, method, spectrum)
  otherwise = None if interval is None else spectral_step(0.0, interval_method)
  direction = _interval_rule(ht_step, otherwise, interval, interval_first)

  def init_fn(params):
    return momentum.init(params)._replace(spectral=ht_step.init(params))

  def update_fn(updates, state, params=None):
    n, new_state = momentum.update(updates, state, params)
    new_updates, spectral = direction(state.count, n, state.spectral, params)
    if adaptive:
      new_updates = _dual_norm(weight_dimension_numbers, n, new_updates)
    return new_updates, new_state._replace(spectral=spectral)

  return optax.GradientTransformation(init_fn, update_fn)
