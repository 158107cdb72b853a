"""HTMuon as composable `optax.GradientTransformation`s.

The HTMuon update of a weight matrix is the chain

  momentum (`scale_by_htmuon`'s EMA + Nesterov)
  -> spectral power `U diag(s**p) V^T` (`scale_by_spectral_power`)
  -> shape scaling (`scale_by_shape`)

followed by optax's `add_decayed_weights` and `scale_by_learning_rate`
(see `htmuon_jax.alias.htmuon`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from htmuon_jax import checks
from htmuon_jax import numerics as ht_numerics
from htmuon_jax import dimension_numbers as dn
from htmuon_jax import methods
from htmuon_jax import newton_schulz as ns_lib
from htmuon_jax import optax_compat as numerics
from htmuon_jax import optax_compat as optax_utils
from htmuon_jax import sharding as sharding_lib
from htmuon_jax import spectral
from htmuon_jax import streaming

__all__ = [
  "ScaleByHTMuonState",
  "ScaleByIntervalState",
  "scale_by_dual_norm",
  "scale_by_htmuon",
  "scale_by_interval",
  "scale_by_shape",
  "scale_by_spectral_power",
]


def scale_by_spectral_power(
  power: chex.Numeric = 0.125,
  *,
  method: spectral.MethodLike = "auto",
  eps: chex.Numeric = methods.DEFAULT_EPS,
  spectrum: str = "power",
  rank: Optional[int] = None,
  stream_qr: str = "qr",
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  ns_coeffs: ns_lib.NSCoeffs = ns_lib.DEFAULT_NS_COEFFS,
  ns_steps: int = 5,
  ns_preconditioning: ns_lib.Preconditioning = "frobenius",
  ns_eps: float = 1e-8,
  distribute: sharding_lib.DistributeLike = None,
  stream_side: str = "smaller",
  precision: str = "auto",
) -> optax.GradientTransformation:
  """Replaces each matrix update `M = U S V^T` by `U S**power V^T`.

  Args:
    power: exponent `p` in [0, 1] (`0`: Muon's `U V^T`; `1`: identity).
    method: how to compute it; see `htmuon_jax.spectral_power`. Also
      `"stream"`: the streaming power iteration, one QR step per update with
      the basis kept in the state (see `htmuon_jax.streaming`).
    eps: relative cutoff: singular values `s <= eps * s_max` count as zero.
    spectrum: `"power"` (`U diag(s**power) V^T`) or `"rank"` (the authors'
      `U diag(i**-power) V^T`; methods `"auto"`, `"svd"`, `"eigh"`,
      `"stream"`).
    rank: `method="stream"` only: number of tracked singular directions
      (`None`: all). Static.
    stream_qr: `method="stream"` only: `"qr"` or `"cholesky"`.
    weight_dimension_numbers: which leaves are matrices and how to reshape
      them: `None` (the default routing of `resolve_dimension_numbers`: 2-D
      leaves, stacked layers as batches), a `MuonDimensionNumbers`, a prefix tree
      of them (`None` entries pass through unchanged), or a callable
      returning such a tree from the updates.
    ns_coeffs: Newton-Schulz coefficients (`method="newton_schulz"` only).
    ns_steps: Newton-Schulz iterations (`method="newton_schulz"` only).
    ns_preconditioning: Newton-Schulz input scaling (`"newton_schulz"` only).
    ns_eps: Newton-Schulz normalization guard (`"newton_schulz"` only).
    distribute: `None` (default: GSPMD partitions the step like any other
      code), or where to run the distributed spectral step: a
      `jax.sharding.Mesh` (all its devices), mesh axis name(s) of the mesh set
      with `jax.set_mesh`, or a `htmuon_jax.sharding.Distribute`. Matrices of
      equal shape are spread whole over those devices; see
      `htmuon_jax.sharding`. With `method="stream"` each matrix's basis
      travels with it (see `scale_by_stream_spectral_power`).
    stream_side: `method="stream"` only: the basis on the `"smaller"` side
      of each matrix (default) or on its `"fan_in"` side (the authors').
    precision: `"auto"` (default), `"accurate"` or `"fast"`
      (bfloat16-operand products with float32 accumulation) for
      `"polynomial"` and `"newton_schulz"`; see
      `spectral_power`. The polynomial's coefficients are designed here,
      when the transformation is built.

  Returns:
    A stateless `optax.GradientTransformation`; with `method="stream"` its
    state is a `streaming.ScaleByStreamState`.

  References:
    Pang et al., `HTMuon: Improving Muon via Heavy-Tailed Spectral
    Correction <https://arxiv.org/abs/2603.10067>`_, 2026.
  """
  # Validated even where the chosen method does not use them.
  streaming.check_stream_options(rank, stream_qr)
  check_ns_steps(ns_steps)
  checks.check_power(power)
  checks.check_eps(eps)
  m = spectral.get_method(
    method,
    ns_coeffs=ns_coeffs,
    ns_steps=ns_steps,
    ns_preconditioning=ns_preconditioning,
    ns_eps=ns_eps,
    rank=rank,
    stream_qr=stream_qr,
    stream_side=stream_side,
    precision=precision,
  )
  m.validate(power, eps, spectrum)
  spectral.prepare_method(m, power, eps, precision)
  return methods.scale_by_method(
    m,
    power,
    eps=eps,
    spectrum=spectrum,
    weight_dimension_numbers=weight_dimension_numbers,
    distribute=distribute,
  )


def check_ns_steps(ns_steps: Any) -> None:
  """Raises ValueError unless a concrete `ns_steps` is an integer >= 1.

  A traced value (injected under `optax.inject_hyperparams` and jit) passes.
  """
  if isinstance(ns_steps, bool):
    raise ValueError(f"ns_steps must be a positive int, got {ns_steps!r}.")
  try:
    v = checks.concrete_scalar(ns_steps, "ns_steps")
  except ValueError:
    raise ValueError(
      f"ns_steps must be a positive int, got {ns_steps!r}."
    ) from None
  if v is not None and (v < 1 or v != int(v)):
    raise ValueError(f"ns_steps must be a positive int, got {ns_steps!r}.")


def check_mu_dtype(mu_dtype: Any) -> Any:
  """`mu_dtype` canonicalized; ValueError unless None or a float dtype."""
  mu_dtype = optax_utils.canonicalize_dtype(mu_dtype)
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
  _check_interval(interval, "newton_schulz")
  offset = 0 if interval_first else 1

  def init_fn(params):
    return ScaleByIntervalState(
      count=jnp.zeros([], jnp.int32), inner=every.init(params)
    )

  traced = checks.concrete_scalar(interval, "interval") is None

  def update_fn(updates, state, params=None):
    def other(u, inner):
      return otherwise.update(u, optax.EmptyState(), params)[0], inner

    k: Any = interval
    if traced:
      # An injected interval cannot raise under jit: below 1, fractional or
      # non-finite, the updates are NaN and `every`'s state is kept (never
      # silently interval=1).
      valid: Any = (interval >= 1) & (interval == jnp.floor(interval))
      k = jnp.where(valid, interval, 1)
    new_updates, inner = jax.lax.cond(
      (state.count + offset) % k == 0,
      lambda u, inner: every.update(u, inner, params),
      other,
      updates,
      state.inner,
    )
    if traced:
      new_updates = jax.tree.map(
        lambda u: ht_numerics.restore_non_finite(u, valid), new_updates
      )
      inner = jax.tree.map(
        lambda new, old: jnp.where(valid, new, old), inner, state.inner
      )
    return new_updates, ScaleByIntervalState(
      count=numerics.safe_increment(state.count), inner=inner
    )

  return optax.GradientTransformation(init_fn, update_fn)


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

  def update_fn(updates, state, params=None):
    new_updates, state = inner.update(updates, state, params)
    dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, updates)
    return dn.map_with_dimension_numbers(
      lambda d, n, o: o if d is None else jnp.sum(n.conj() * o) * o,
      dim_tree,
      updates,
      new_updates,
    ), state

  return optax.GradientTransformation(inner.init, update_fn)


class ScaleByHTMuonState(NamedTuple):
  """State of `scale_by_htmuon`."""

  count: jax.Array  # type: ignore[assignment]  # int32: updates so far.
  mu: optax.Updates  # EMA of the gradients.
  # State of the spectral step: empty, or the basis of method="stream".
  spectral: optax.OptState = optax.EmptyState()


def _check_interval(
  interval: Any, interval_method: spectral.MethodLike
) -> None:
  # interval_method is checked even without an interval.
  try:
    stateful = spectral.get_method(interval_method).stateful
  except ValueError:
    stateful = None
  if stateful is not False:
    raise ValueError(
      "interval_method: expected a stateless method (one of "
      f"{spectral.method_names()} but 'stream', or a method object), got "
      f"{interval_method!r}."
    )
  if interval is None:
    return
  v = checks.concrete_scalar(interval, "interval")
  if v is not None and (v < 1 or v != int(v)):
    raise ValueError(f"interval must be None or an int >= 1, got {interval!r}.")


def scale_by_htmuon(
  power: chex.Numeric = 0.125,
  beta: chex.Numeric = 0.95,
  *,
  nesterov: bool = True,
  bias_correction: bool = True,
  mu_dtype: Optional[Any] = None,
  method: spectral.MethodLike = "auto",
  eps: chex.Numeric = methods.DEFAULT_EPS,
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  adaptive: bool = False,
  spectrum: str = "power",
  rank: Optional[int] = None,
  stream_qr: str = "qr",
  interval: Optional[int] = None,
  interval_method: spectral.MethodLike = "newton_schulz",
  ns_coeffs: ns_lib.NSCoeffs = ns_lib.DEFAULT_NS_COEFFS,
  ns_steps: int = 5,
  ns_preconditioning: ns_lib.Preconditioning = "frobenius",
  ns_eps: float = 1e-8,
  distribute: sharding_lib.DistributeLike = None,
  interval_first: bool = False,
  stream_side: str = "smaller",
  precision: str = "auto",
) -> optax.GradientTransformation:
  """HTMuon's direction: momentum, then `U diag(s**power) V^T` per matrix.

  With `m` the EMA `m <- beta m + (1 - beta) g`, the spectral power is taken
  of `n = beta m + (1 - beta) g` (Nesterov) or of `m`.

  Args:
    power: exponent `p` in [0, 1]; the paper uses 0.125. `0` is Muon.
    beta: EMA decay of the momentum, in [0, 1).
    nesterov: whether to use the Nesterov look-ahead.
    bias_correction: divide `m` and `g` by `1 - beta**t` as
      `optax.contrib.muon` does (default, for drop-in parity). `False` gives
      the HTMuon authors' PyTorch rule exactly (no bias correction). The two
      differ only during the first ~`3 / (1 - beta)` steps.
    mu_dtype: dtype of the momentum accumulator (`None`: the params' dtype).
    method: how to compute the spectral power; see `spectral_power`.
    eps: relative cutoff for tiny singular values (see `spectral_power`).
    weight_dimension_numbers: which leaves are matrices and how to reshape
      them (see `scale_by_spectral_power`). Non-matrix leaves receive the
      momentum unchanged.
    adaptive: scale each update by `<n, update>`, the dual norm of the
      momentum (Bernstein & Newhouse 2024), as optax's `adaptive` flag.
    spectrum: `"power"` or `"rank"` (`U diag(i**-power) V^T`); see
      `scale_by_spectral_power`.
    rank: streaming rank (`method="stream"` only; `None`: full).
    stream_qr: `"qr"` or `"cholesky"` (`method="stream"` only).
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
      `"polynomial"`, ...).
    ns_coeffs: Newton-Schulz coefficients (`method="newton_schulz"` only).
    ns_steps: Newton-Schulz iterations (`method="newton_schulz"` only).
    ns_preconditioning: Newton-Schulz input scaling (`"newton_schulz"` only).
    ns_eps: Newton-Schulz normalization guard (`"newton_schulz"` only).
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
    stream_side: `method="stream"`: the basis on the `"smaller"` side of
      each matrix (default) or on its `"fan_in"` side (the authors'); see
      `htmuon_jax.streaming`.
    precision: `"auto"`, `"accurate"` or `"fast"` for the product-only
      methods (also
      the `interval` steps); see `scale_by_spectral_power`.

  Returns:
    An `optax.GradientTransformation` with state `ScaleByHTMuonState`.

  References:
    Pang et al., `HTMuon: Improving Muon via Heavy-Tailed Spectral
    Correction <https://arxiv.org/abs/2603.10067>`_, 2026.

    Jordan, `Muon <https://github.com/KellerJordan/Muon>`_, 2024.
  """
  checks.check_range(beta, "beta", 0.0, 1.0, high_open=True)
  _check_interval(interval, interval_method)
  if not isinstance(adaptive, (bool, np.bool_)):
    raise ValueError(f"adaptive must be a bool, got {adaptive!r}.")
  mu_dtype = check_mu_dtype(mu_dtype)
  spectral_step = scale_by_spectral_power(
    power,
    method=method,
    eps=eps,
    spectrum=spectrum,
    rank=rank,
    stream_qr=stream_qr,
    weight_dimension_numbers=weight_dimension_numbers,
    ns_coeffs=ns_coeffs,
    ns_steps=ns_steps,
    ns_preconditioning=ns_preconditioning,
    ns_eps=ns_eps,
    distribute=distribute,
    stream_side=stream_side,
    precision=precision,
  )
  # HT step when (count + offset) % interval == 0, count = updates made
  # before this one: offset 1 gives updates k, 2k, ... (the authors').
  interval_offset = 0 if interval_first else 1

  if interval is not None:
    muon_step = scale_by_spectral_power(
      0.0,
      method=interval_method,
      eps=eps,
      weight_dimension_numbers=weight_dimension_numbers,
      ns_coeffs=ns_coeffs,
      ns_steps=ns_steps,
      ns_preconditioning=ns_preconditioning,
      ns_eps=ns_eps,
      distribute=distribute,
      precision=precision,
    )

  def init_fn(params):
    return ScaleByHTMuonState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params, dtype=mu_dtype),
      spectral=spectral_step.init(params),
    )

  def update_fn(updates, state, params=None):
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count = numerics.safe_increment(state.count)
    if bias_correction:
      mu_hat = optax.tree.bias_correction(mu, beta, count)
      if nesterov:
        # optax's Nesterov: each term corrected for its own step count.
        mu_hat = jax.tree.map(
          lambda m, g: beta * m + (1 - beta) * g,
          optax.tree.bias_correction(mu, beta, numerics.safe_increment(count)),
          optax.tree.bias_correction(updates, beta, count),
        )
    elif nesterov:
      mu_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, mu, updates)
    else:
      mu_hat = mu

    def ht_step(m, spectral_state):
      return spectral_step.update(m, spectral_state, params)

    if interval is None:
      new_updates, spectral_state = ht_step(mu_hat, state.spectral)
    else:

      def muon(m, spectral_state):
        return muon_step.update(m, optax.EmptyState(), params)[
          0
        ], spectral_state

      k: Any = interval
      traced = checks.concrete_scalar(interval, "interval") is None
      if traced:  # out of range: NaN updates, state kept (scale_by_interval)
        valid: Any = (interval >= 1) & (interval == jnp.floor(interval))
        k = jnp.where(valid, interval, 1)
      new_updates, spectral_state = jax.lax.cond(
        (state.count + interval_offset) % k == 0,
        ht_step,
        muon,
        mu_hat,
        state.spectral,
      )
      if traced:
        new_updates = jax.tree.map(
          lambda u: ht_numerics.restore_non_finite(u, valid), new_updates
        )
        spectral_state = jax.tree.map(
          lambda new, old: jnp.where(valid, new, old),
          spectral_state,
          state.spectral,
        )
    if adaptive:
      new_updates = jax.tree.map(
        lambda n, o: jnp.sum(n.conj() * o) * o, mu_hat, new_updates
      )
    return new_updates, ScaleByHTMuonState(
      count=count, mu=optax.tree.cast(mu, mu_dtype), spectral=spectral_state
    )

  return optax.GradientTransformation(init_fn, update_fn)
