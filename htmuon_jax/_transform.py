"""`spectral_power` and HTMuon's update as composable optax transformations.

A matrix's HTMuon direction is `scale_by_momentum` -> `scale_by_spectral_power`
(every `k`-th update with `scale_by_interval`) -> optionally
`scale_by_dual_norm` -> `scale_by_shape`; `scale_by_htmuon` runs the first
three in one state. Each rule is written once, here. The methods' accuracy,
the tiny-singular-value rule and non-finite inputs: docs/reliability.md.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from htmuon_jax import _checks as checks
from htmuon_jax import _dimension_numbers as dn
from htmuon_jax import _matrix_state as matrix_state
from htmuon_jax import methods
from htmuon_jax import _numerics as numerics
from htmuon_jax import sharding as sharding_lib
from htmuon_jax.methods import _newton_schulz as ns_lib


def spectral_power(
  x: jax.Array,
  power: Any,
  *,
  method: methods.MethodLike = "auto",
  eps: Any = methods.DEFAULT_EPS,
  spectrum: str = "power",
) -> jax.Array:
  """Returns `U diag(s**power) V^T` for the last two axes of `x`.

  Singular values `s <= eps * s_max` count as zero (also for `power=0`);
  each method's accuracy, dtypes and non-finite inputs are described in
  [Reliability](../reliability.md#accuracy-of-the-methods).

  Examples:
    >>> import jax.numpy as jnp
    >>> from htmuon_jax import spectral_power
    >>> x = jnp.diag(jnp.array([16.0, 1.0]))
    >>> print(jnp.diag(spectral_power(x, 0.25, method="svd")).round(4))
    [2. 1.]
    >>> spectral_power(jnp.ones((3, 4, 5)), 0.125).shape  # 3 matrices 4 x 5
    (3, 4, 5)

  Args:
    x: array of shape `(..., m, n)`; leading axes are a batch of matrices.
    power: exponent `p` in [0, 1]; may be traced for `"svd"` and `"eigh"`
      (no recompilation); `"newton_schulz"` needs 0.
    method: a registered name (`"auto"`, `"svd"`, `"eigh"`,
      `"newton_schulz"`, `"polynomial"`, `"express"`, ...) or a stateless
      method object with its options (e.g. `methods.NewtonSchulz(steps=3)`).
    eps: relative cutoff: singular values `s <= eps * s_max` count as zero.
    spectrum: `"power"`, or `"rank"` for the authors' `U diag(i**-power)
      V^T` (methods that order the singular values: `"auto"`, `"svd"`,
      `"eigh"`).

  Returns:
    An array with the shape and dtype of `x` (`U diag(s**power) V^H` for
    complex `x`).

  Raises:
    ValueError: for a `power` outside [0, 1], an unknown or stateful
      `method`, a `power` or `spectrum` the method cannot take, or an `x`
      of rank < 2 or not floating point.
  """
  checks.check_power(power)
  checks.check_eps(eps)
  m = methods.check_method(method, power)
  m.validate(power, eps, spectrum)
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
    method: as in `spectral_power`, or a stateful method (`"stream"`, the
      streaming power iteration, keeps its basis in the state).
    eps: relative cutoff: singular values `s <= eps * s_max` count as zero.
    spectrum: `"power"` or `"rank"` (see `spectral_power`; also `"stream"`).
    weight_dimension_numbers: which leaves are matrices and how to reshape
      them: `None` (the default routing of `resolve_dimension_numbers`), a
      `MuonDimensionNumbers`, a prefix tree of them (`None` entries pass
      through) or a callable returning one from the updates.
    distribute: `None` (GSPMD partitions the step), where to spread whole
      matrices of equal shape (a `Mesh`, mesh axis name(s), a
      `sharding.Distribute`; a stateful method's state travels with its
      matrix), or an `htmuon_jax.Execution`; see [Sharding](../sharding.md).

  Returns:
    An `optax.GradientTransformation`: stateless, or with the method's
    `state_type` for a stateful method.
  """
  checks.check_power(power)
  checks.check_eps(eps)
  m = methods.get_method(method)
  m.validate(power, eps, spectrum)
  m.resolve(power, eps, spectrum).prepare(power, eps)  # never in a jitted step
  execution = sharding_lib.as_execution(distribute)

  def run(x, state, power, eps):
    return methods.run_method(m, x, state, power, eps, spectrum)

  if not m.stateful:

    def fn(x: jax.Array, power: Any, eps: Any) -> jax.Array:
      return run(x, None, power, eps)[0]

    def stateless_update(updates, state, params=None):
      methods.check_state(m, state, updates, None)
      # U f(S) V^T commutes with transposition: tall and wide matrices of
      # transposed shapes can share a distributed group.
      new_updates, _ = matrix_state.update_per_matrix(
        fn,
        updates,
        None,
        weight_dimension_numbers,
        execution,
        args=(power, eps),
        transpose_equivariant=True,
      )
      return new_updates, state

    return optax.GradientTransformation(
      optax.init_empty_state, stateless_update
    )

  def init_fn(params):
    return m.state_type(
      matrix_state.init_per_matrix(m.init, params, weight_dimension_numbers)
    )

  def update_fn(updates, state, params=None):
    methods.check_state(m, state, updates, init_fn)  # trace time only
    new_updates, new_state = matrix_state.update_per_matrix(
      run,
      updates,
      state[0],
      weight_dimension_numbers,
      execution,
      args=(power, eps),
    )
    return new_updates, m.state_type(new_state)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_shape(
  *,
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  consistent_rms: Optional[chex.Numeric] = None,
) -> optax.GradientTransformation:
  """Scales matrix updates by a factor of their shape, as Muon does.

  Args:
    weight_dimension_numbers: which leaves are matrices (see
      `scale_by_spectral_power`); other leaves pass through.
    consistent_rms: `None` for `sqrt(max(1, fan_out / fan_in))` (Keller
      Jordan's, used by the HTMuon authors), or `c` for `c * sqrt(max(fan_in,
      fan_out))` (Liu et al. 2025; `0.2` matches AdamW's update RMS).

  Returns:
    A stateless `optax.GradientTransformation`.

  Raises:
    ValueError: for a negative `consistent_rms` (gradient ascent).
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


def check_interval_method(interval_method: methods.MethodLike) -> None:
  """ValueError unless `interval_method` is a stateless method."""
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


def _interval_rule(
  every: optax.GradientTransformation,
  otherwise: Optional[optax.GradientTransformation],
  interval: Optional[chex.Numeric],
  interval_first: bool,
) -> Any:
  """`step(count, updates, inner, params)`, the one copy of the interval rule
  (see `scale_by_interval`); `interval=None` runs `every` on each update."""
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
  """`every` on every `interval`-th update, `otherwise` on the others.

  By default `every` runs on updates `k, 2k, ...` (1-indexed: the authors'
  code increments its counter before testing `step % k == 0`), with
  `interval_first=True` on updates `1, k + 1, ...` (version 0.1.0's rule).
  The choice is a `lax.cond` in the jitted step: one program, and `interval`
  may be injected.

  Args:
    every: the transformation of every `interval`-th update; its state
      advances only on its own updates.
    otherwise: a stateless transformation for the other updates.
    interval: `k >= 1`. An injected `k` below 1, fractional or non-finite
      gives NaN updates and keeps `every`'s state (never another interval).
    interval_first: see above.

  Returns:
    An `optax.GradientTransformation` with state `ScaleByIntervalState`.
  """
  step = _interval_rule(every, otherwise, interval, interval_first)

  def init_fn(params):
    return ScaleByIntervalState(jnp.zeros([], jnp.int32), every.init(params))

  def update_fn(updates, state, params=None):
    new_updates, inner = step(state.count, updates, state.inner, params)
    count = optax.safe_increment(state.count)
    return new_updates, ScaleByIntervalState(count, inner)

  return optax.GradientTransformation(init_fn, update_fn)


def _dual_norm_rule(weight_dimension_numbers: dn.WeightDimNumOrFn) -> Any:
  """`scale(n, d)`: `<n, d> d` per matrix leaf, `d` for the others."""

  def scale(n, d):
    dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, n)
    return dn.map_with_dimension_numbers(
      lambda dims, n, o: o if dims is None else jnp.sum(n.conj() * o) * o,
      dim_tree,
      n,
      d,
    )

  return scale


def scale_by_dual_norm(
  inner: optax.GradientTransformation,
  *,
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
) -> optax.GradientTransformation:
  """`<n, d> d` for each matrix leaf, with `d` = `inner`'s update of `n`.

  `optax.contrib.muon`'s `adaptive` rule (Bernstein & Newhouse 2024) as a
  wrapper; other leaves get `inner`'s update unchanged.

  Args:
    inner: the direction (e.g. a spectral step).
    weight_dimension_numbers: which leaves are matrices (see
      `scale_by_spectral_power`).

  Returns:
    An `optax.GradientTransformation` with `inner`'s state.
  """
  scale = _dual_norm_rule(weight_dimension_numbers)

  def update_fn(updates, state, params=None):
    new_updates, state = inner.update(updates, state, params)
    return scale(updates, new_updates), state

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
    bias_correction: divide by `1 - beta**t` as `optax.contrib.muon` (each
      Nesterov term for its own step count); `False` is the HTMuon authors'
      rule (they differ in the first ~`3 / (1 - beta)` steps).
    mu_dtype: dtype of the accumulator (`None`: the params' dtype).

  Returns:
    An `optax.GradientTransformation` with state `ScaleByHTMuonState` (its
    `spectral` field empty).
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

  `scale_by_momentum` -> `scale_by_spectral_power` (every `interval`-th
  update as `scale_by_interval`) -> `scale_by_dual_norm` with `adaptive`,
  in one state.

  Args:
    power: exponent `p` in [0, 1]; the paper uses 0.125. `0` is Muon.
    beta: EMA decay of the momentum, in [0, 1).
    nesterov: see `scale_by_momentum`.
    bias_correction: see `scale_by_momentum`.
    mu_dtype: dtype of the momentum accumulator (`None`: the params' dtype).
    method: a name or a method object (see `scale_by_spectral_power`).
    eps: relative cutoff for tiny singular values.
    weight_dimension_numbers: which leaves are matrices (see
      `scale_by_spectral_power`); other leaves receive the momentum.
    adaptive: scale each matrix update by `<n, update>` (optax's flag).
    spectrum: `"power"` or `"rank"` (see `spectral_power`).
    interval: `None`, or `k >= 1`: the HT step on every `k`-th update (the
      authors' interval mode, `k = 5` in their 1B run) and `interval_method`
      on the others, as `scale_by_interval`; may be injected. The streaming
      basis advances only on HT steps.
    interval_method: a stateless method for the other steps (default
      Muon's Newton-Schulz).
    ns_coeffs: Newton-Schulz coefficients of a method given by name.
    ns_steps: Newton-Schulz iterations of a method given by name.
    ns_preconditioning: Newton-Schulz input scaling of a method given by name.
    ns_eps: Newton-Schulz normalization guard of a method given by name.
    distribute: see `scale_by_spectral_power`; with `interval` both the HT
      and the other steps are distributed.
    interval_first: see `scale_by_interval`.

  Returns:
    An `optax.GradientTransformation` with state `ScaleByHTMuonState`.

  References:
    Pang et al., `HTMuon: Improving Muon via Heavy-Tailed Spectral
    Correction <https://arxiv.org/abs/2603.10067>`_, 2026.
  """
  check_interval_method(interval_method)
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
  dual_norm = _dual_norm_rule(weight_dimension_numbers)

  def init_fn(params):
    return momentum.init(params)._replace(spectral=ht_step.init(params))

  def update_fn(updates, state, params=None):
    n, new_state = momentum.update(updates, state, params)
    new_updates, spectral = direction(state.count, n, state.spectral, params)
    if adaptive:
      new_updates = dual_norm(n, new_updates)
    return new_updates, new_state._replace(spectral=spectral)

  return optax.GradientTransformation(init_fn, update_fn)
