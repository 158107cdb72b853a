"""HTMuon as composable `optax.GradientTransformation`s.

The HTMuon update of a weight matrix is the chain

  momentum (`scale_by_momentum`: EMA + Nesterov)
  -> spectral power `U diag(s**p) V^T` (`scale_by_spectral_power`), every
     `k`-th update with `interval=k` (`scale_by_interval`)
  -> optionally the dual-norm scale (`scale_by_dual_norm`)
  -> shape scaling (`scale_by_shape`)

followed by optax's `add_decayed_weights` and `scale_by_learning_rate`
(see `htmuon_jax._alias.htmuon`). `scale_by_htmuon` is the first three
pieces in one state (`ScaleByHTMuonState`), each rule written once here.
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
from htmuon_jax import _grouping as grouping
from htmuon_jax import methods
from htmuon_jax import _numerics as numerics
from htmuon_jax import sharding as sharding_lib
from htmuon_jax.methods import _newton_schulz as ns_lib


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

  The method's own options (Newton-Schulz steps, the streaming rank, the
  products' precision, ...) are its fields: pass an object, e.g.
  `method=htmuon_jax.methods.Stream(rank=8)`, or build one from optax-style
  flat keywords with `htmuon_jax.methods.from_keywords`.

  Args:
    power: exponent `p` in [0, 1] (`0`: Muon's `U V^T`; `1`: identity).
    method: a registered name or a method object; see
      `htmuon_jax.spectral_power`. Also `"stream"`: the streaming power
      iteration, one QR step per update with the basis kept in the state
      (see `htmuon_jax.methods._stream`).
    eps: relative cutoff: singular values `s <= eps * s_max` count as zero.
    spectrum: `"power"` (`U diag(s**power) V^T`) or `"rank"` (the authors'
      `U diag(i**-power) V^T`; methods `"auto"`, `"svd"`, `"eigh"`,
      `"stream"`).
    weight_dimension_numbers: which leaves are matrices and how to reshape
      them: `None` (the default routing of `resolve_dimension_numbers`: 2-D
      leaves, stacked layers as batches), a `MuonDimensionNumbers`, a prefix
      tree of them (`None` entries pass through unchanged), or a callable
      returning such a tree from the updates.
    distribute: `None` (default: GSPMD partitions the step like any other
      code), or where to run the distributed spectral step: a
      `jax.sharding.Mesh` (all its devices), mesh axis name(s) of the mesh set
      with `jax.set_mesh`, or a `htmuon_jax.sharding.Distribute`. Matrices of
      equal shape are spread whole over those devices; see
      `htmuon_jax.sharding`. With `method="stream"` each matrix's basis
      travels with it (see `methods.stream`). An
      `htmuon_jax.Execution` sets this and how equal-shape leaves are
      grouped and chunked on one device.

  Returns:
    A stateless `optax.GradientTransformation`; with a stateful method its
    state is the method's `state_type` (`methods.stream.ScaleByStreamState`).

  References:
    Pang et al., `HTMuon: Improving Muon via Heavy-Tailed Spectral
    Correction <https://arxiv.org/abs/2603.10067>`_, 2026.
  """
  checks.check_power(power)
  checks.check_eps(eps)
  m = methods.get_method(method)
  m.validate(power, eps, spectrum)
  # Construction-time work (the polynomial's design), never in a jitted step.
  m.resolve(power, eps, spectrum).prepare(power, eps)
  return _scale_by_method(
    m,
    power,
    eps=eps,
    spectrum=spectrum,
    weight_dimension_numbers=weight_dimension_numbers,
    distribute=distribute,
  )


def _scale_by_method(
  method: methods.SpectralMethod,
  power: Any,
  *,
  eps: Any = methods.DEFAULT_EPS,
  spectrum: str = "power",
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  distribute: sharding_lib.ExecutionLike = None,
) -> optax.GradientTransformation:
  """`U diag(f(s)) V^T` of each matrix update by `method`, per matrix.

  Stateless methods give a stateless transformation; stateful ones keep
  their per-matrix state (`method.init` of each matrix stack) in a
  `method.state_type`. Both run through `matrix_state.update_per_matrix`,
  with `distribute=` (the state travels with its matrix).

  Args:
    method: the (validated) method object.
    power: exponent in [0, 1]; may be traced unless `method.static_power`.
    eps: relative cutoff.
    spectrum: `"power"` or `"rank"`.
    weight_dimension_numbers: which leaves are matrices (see
      `htmuon_jax.scale_by_spectral_power`).
    distribute: how the step runs: where the distributed step spreads the
      matrices, or an `Execution` (see `htmuon_jax.sharding`).

  Returns:
    An `optax.GradientTransformation`.
  """
  # Validated once, at construction; the normalized form goes down.
  execution = sharding_lib.as_execution(distribute)

  if not method.stateful:

    def fn(m: jax.Array, power: Any, eps: Any) -> jax.Array:
      return methods.run_method(method, m, None, power, eps, spectrum)[0]

    def stateless_update(updates, state, params=None):
      del params
      methods.check_state(method, state, updates, None)
      # U f(S) V^T commutes with transposition, so tall and wide matrices of
      # transposed shapes can share a distributed group.
      new_updates, _ = grouping.update_per_matrix(
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

  def step(m: jax.Array, s: Any, power: Any, eps: Any) -> tuple[Any, Any]:
    return methods.run_method(method, m, s, power, eps, spectrum)

  def init_fn(params):
    return method.state_type(
      grouping.init_per_matrix(method.init, params, weight_dimension_numbers)
    )

  def update_fn(updates, state, params=None):
    del params
    methods.check_state(method, state, updates, init_fn)  # trace time only
    # `power` and `eps` may be traced (injected): passed as arguments.
    new_updates, new_state = grouping.update_per_matrix(
      step,
      updates,
      state[0],
      weight_dimension_numbers,
      execution,
      args=(power, eps),
    )
    return new_updates, method.state_type(new_state)

  return optax.GradientTransformation(init_fn, update_fn)


def check_ns_steps(ns_steps: Any) -> None:
  """Raises ValueError unless a concrete `ns_steps` is an integer >= 1.

  A traced value (injected under `optax.inject_hyperparams` and jit) passes.
  """
  ns_lib.check_ns_steps(ns_steps)


def check_mu_dtype(mu_dtype: Any) -> Any:
  """`mu_dtype` canonicalized; ValueError unless None or a float dtype."""
  if mu_dtype is not None:
    mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype)
  if mu_dtype is not None and not jnp.issubdtype(mu_dtype, jnp.inexact):
    raise ValueError(
      f"mu_dtype must be None or a floating-point dtype, got {mu_dtype!r} "
      "(an integer momentum truncates every update to 0)."
    )
  return mu_dtype


def scale_by_shape(
  *,
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  consistent_rms: Optional[chex.Numeric] = None,
) -> optax.GradientTransformation:
  """Scales matrix updates by a factor of their shape, as Muon does.

  Args:
    weight_dimension_numbers: which leaves are matrices (see
      `scale_by_spectral_power`); other leaves pass through unchanged.
    consistent_rms: if `None`, scale by `sqrt(max(1, fan_out / fan_in))`
      (Keller Jordan's width scaling, used by the HTMuon authors); else by
      `consistent_rms * sqrt(max(fan_in, fan_out))` (Liu et al. 2025; `0.2`
      matches AdamW's update RMS).

  Returns:
    A stateless `optax.GradientTransformation`.

  Raises:
    ValueError: for a negative `consistent_rms` (it would turn the update
      into gradient ascent).
  """
  if consistent_rms is not None:
    checks.check_range(consistent_rms, "consistent_rms", 0.0, float("inf"))

  def scale(d: Any, u: jax.Array) -> jax.Array:
    if d is None:
      return u
    fan_in, fan_out = dn.fan_in_fan_out(u.shape, d)
    if u.size == 0:
      return u  # An empty matrix (a zero-size axis) has nothing to scale.
    if consistent_rms is None:
      factor = max(1.0, fan_out / fan_in) ** 0.5
    else:
      factor = consistent_rms * max(fan_in, fan_out) ** 0.5
    return (factor * u).astype(u.dtype)

  def update_fn(updates, state, params=None):
    del params
    dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, updates)
    return dn.map_with_dimension_numbers(scale, dim_tree, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


class ScaleByIntervalState(NamedTuple):
  """State of `scale_by_interval`."""

  count: jax.Array  # type: ignore[assignment]  # int32: updates so far.
  inner: optax.OptState  # State of the every-k-th-update transformation.


def check_interval(interval: Any) -> None:
  """Raises ValueError unless a concrete `interval` is None or an int >= 1."""
  if interval is None:
    return
  v = checks.concrete_scalar(interval, "interval")
  if v is not None and (v < 1 or v != int(v)):
    raise ValueError(f"interval must be None or an int >= 1, got {interval!r}.")


def check_interval_method(interval_method: methods.MethodLike) -> None:
  """Raises ValueError unless `interval_method` is a stateless method."""
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
  otherwise: optax.GradientTransformation,
  interval: chex.Numeric,
  interval_first: bool,
) -> Any:
  """`step(count, updates, inner, params)`: the one copy of the interval rule.

  `every` on the updates with `(count + offset) % interval == 0` (`count`:
  updates made before this one; offset 1, or 0 with `interval_first`),
  `otherwise` (stateless) on the others, by `lax.cond`. A traced interval
  that is not an int >= 1 gives NaN updates and keeps `inner`.
  """
  check_interval(interval)
  offset = 0 if interval_first else 1
  traced = checks.concrete_scalar(interval, "interval") is None

  def step(count, updates, inner, params):
    def other(u, inner):
      return otherwise.update(u, optax.EmptyState(), params)[0], inner

    k: Any = interval
    if traced:
      # An injected interval cannot raise under jit: below 1, fractional or
      # non-finite, the updates are NaN and `every`'s state is kept (never
      # silently interval=1).
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

  The rule of `scale_by_htmuon`'s `interval`: by default `every` runs on
  updates `k, 2k, ...` (1-indexed, the authors' counter), with
  `interval_first=True` on updates `1, k + 1, ...`. The choice is a `lax.cond`
  inside the jitted step: one compiled program, and `interval` may be
  injected / traced. `otherwise` must be stateless (e.g. Muon's `U V^T`);
  `every`'s state advances only on its own updates.

  Args:
    every: the transformation of every `interval`-th update (e.g. the HT
      step).
    otherwise: a stateless transformation for the other updates.
    interval: `k >= 1`. An injected (traced) `k` below 1, fractional or
      non-finite gives NaN updates (and keeps `every`'s state): it cannot
      raise under `jit`, and is never silently another interval.
    interval_first: see above.

  Returns:
    An `optax.GradientTransformation` with state `ScaleByIntervalState`.
  """
  step = _interval_rule(every, otherwise, interval, interval_first)

  def init_fn(params):
    return ScaleByIntervalState(
      count=jnp.zeros([], jnp.int32), inner=every.init(params)
    )

  def update_fn(updates, state, params=None):
    new_updates, inner = step(state.count, updates, state.inner, params)
    return new_updates, ScaleByIntervalState(
      count=optax.safe_increment(state.count), inner=inner
    )

  return optax.GradientTransformation(init_fn, update_fn)


def _dual_norm_rule(weight_dimension_numbers: dn.WeightDimNumOrFn) -> Any:
  """`scale(n, d)`: `<n, d> d` per matrix leaf, `d` itself for the others."""

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

  The `adaptive` rule of `optax.contrib.muon` (Bernstein & Newhouse 2024) as a
  wrapper: the direction `d` of the momentum `n` is scaled by the dual norm
  `<n, d>`. Other leaves get `inner`'s update unchanged.

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

  Returns `n = beta m + (1 - beta) g` (Nesterov) or `m`, bias-corrected as
  `optax.contrib.muon` (each Nesterov term for its own step count) unless
  `bias_correction=False`, the HTMuon authors' rule.

  Args:
    beta: EMA decay, in [0, 1).
    nesterov: whether to use the Nesterov look-ahead.
    bias_correction: divide by `1 - beta**t` (see `scale_by_htmuon`).
    mu_dtype: dtype of the accumulator (`None`: the params' dtype).

  Returns:
    An `optax.GradientTransformation` whose state is a `ScaleByHTMuonState`
    with an empty `spectral` field (the layout `scale_by_htmuon` stores).
  """
  checks.check_range(beta, "beta", 0.0, 1.0, high_open=True)
  mu_dtype = check_mu_dtype(mu_dtype)

  def init_fn(params):
    return ScaleByHTMuonState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params, dtype=mu_dtype),
    )

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count = optax.safe_increment(state.count)
    if bias_correction:
      mu_hat = optax.tree.bias_correction(mu, beta, count)
      if nesterov:
        # optax's Nesterov: each term corrected for its own step count.
        mu_hat = jax.tree.map(
          lambda m, g: beta * m + (1 - beta) * g,
          optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
          optax.tree.bias_correction(updates, beta, count),
        )
    elif nesterov:
      mu_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, mu, updates)
    else:
      mu_hat = mu
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

  With `m` the EMA `m <- beta m + (1 - beta) g`, the spectral power is taken
  of `n = beta m + (1 - beta) g` (Nesterov) or of `m`. Composed of the
  module's pieces, in one state: `scale_by_momentum` -> the spectral step
  (`scale_by_spectral_power`, every `interval`-th update with `interval` as
  `scale_by_interval`) -> the dual-norm scale with `adaptive`
  (`scale_by_dual_norm`).

  Args:
    power: exponent `p` in [0, 1]; the paper uses 0.125. `0` is Muon.
    beta: EMA decay of the momentum, in [0, 1).
    nesterov: whether to use the Nesterov look-ahead.
    bias_correction: divide `m` and `g` by `1 - beta**t` as
      `optax.contrib.muon` does (default, for drop-in parity). `False` gives
      the HTMuon authors' PyTorch rule exactly (no bias correction). The two
      differ only during the first ~`3 / (1 - beta)` steps.
    mu_dtype: dtype of the momentum accumulator (`None`: the params' dtype).
    method: how to compute the spectral power: a name or a method object
      (which carries its own options, e.g.
      `htmuon_jax.methods.Stream(rank=8)`); see `spectral_power`.
    eps: relative cutoff for tiny singular values (see `spectral_power`).
    weight_dimension_numbers: which leaves are matrices and how to reshape
      them (see `scale_by_spectral_power`). Non-matrix leaves receive the
      momentum unchanged.
    adaptive: scale each matrix update by `<n, update>`, the dual norm of
      the momentum (Bernstein & Newhouse 2024), as optax's `adaptive` flag.
    spectrum: `"power"` or `"rank"` (`U diag(i**-power) V^T`); see
      `scale_by_spectral_power`.
    interval: `None`, or `k >= 1`: the HT step on every `k`-th update and
      Muon's orthogonalization `U V^T` on the others, the authors' interval
      mode (`k = 5` for their 1B run). By default on updates `k, 2k, 3k,
      ...` (1-indexed), as the authors' code, which increments its step
      counter before testing `step % k == 0`; see `interval_first`. Chosen
      inside the jitted step by `lax.cond` on the state's count: one
      compiled program, and `interval` may be injected / traced. The
      streaming basis advances only on HT steps.
    interval_method: how the non-HT steps compute `U V^T`: `"newton_schulz"`
      (default, Muon's) or any stateless method (`"svd"`, `"eigh"`,
      `"polynomial"`, a method object, ...).
    ns_coeffs: Newton-Schulz coefficients of a method given by name (as
      `optax.contrib.scale_by_muon`).
    ns_steps: Newton-Schulz iterations of a method given by name.
    ns_preconditioning: Newton-Schulz input scaling of a method given by
      name.
    ns_eps: Newton-Schulz normalization guard of a method given by name.
    distribute: `None` (default: GSPMD partitions the step like any other
      code), or where to run the distributed spectral step: a
      `jax.sharding.Mesh` (all its devices), mesh axis name(s) of the mesh set
      with `jax.set_mesh`, or a `htmuon_jax.sharding.Distribute`. Matrices of
      equal shape are spread whole over those devices; see
      `htmuon_jax.sharding`. Every `method` accepts it (`"stream"`: each
      matrix's basis travels with it), and with `interval` both the HT and
      the Muon steps are distributed.
    interval_first: with `interval=k`: `False` (default, the authors' rule):
      HT steps on updates `k, 2k, ...`; `True`: on updates `1, k + 1,
      2k + 1, ...` (the first update is an HT step; the rule of version
      0.1.0).

  Returns:
    An `optax.GradientTransformation` with state `ScaleByHTMuonState`.

  References:
    Pang et al., `HTMuon: Improving Muon via Heavy-Tailed Spectral
    Correction <https://arxiv.org/abs/2603.10067>`_, 2026.

    Jordan, `Muon <https://github.com/KellerJordan/Muon>`_, 2024.
  """
  check_interval_method(interval_method)
  if not isinstance(adaptive, (bool, np.bool_)):
    raise ValueError(f"adaptive must be a bool, got {adaptive!r}.")
  momentum = scale_by_momentum(
    beta, nesterov=nesterov, bias_correction=bias_correction, mu_dtype=mu_dtype
  )
  ns_options = dict(
    ns_coeffs=ns_coeffs,
    ns_steps=ns_steps,
    preconditioning=ns_preconditioning,
    ns_eps=ns_eps,
  )

  def spectral_step(p, m, spectrum="power"):
    return scale_by_spectral_power(
      p,
      method=methods.from_keywords(m, **ns_options),
      eps=eps,
      spectrum=spectrum,
      weight_dimension_numbers=weight_dimension_numbers,
      distribute=distribute,
    )

  ht_step = spectral_step(power, method, spectrum)
  if interval is None:
    check_interval(interval)

    def direction(count, n, inner, params):
      del count
      return ht_step.update(n, inner, params)

  else:
    direction = _interval_rule(
      ht_step, spectral_step(0.0, interval_method), interval, interval_first
    )
  dual_norm = _dual_norm_rule(weight_dimension_numbers)

  def init_fn(params):
    return momentum.init(params)._replace(spectral=ht_step.init(params))

  def update_fn(updates, state, params=None):
    n, new_state = momentum.update(updates, state, params)
    new_updates, spectral_state = direction(
      state.count, n, state.spectral, params
    )
    if adaptive:
      new_updates = dual_norm(n, new_updates)
    return new_updates, new_state._replace(spectral=spectral_state)

  return optax.GradientTransformation(init_fn, update_fn)
