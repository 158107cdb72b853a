"""What a spectral method is (`SpectralMethod`), and the steps every method
shares (`run_method`); see the package docstring."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from htmuon_jax import sharding as sharding_lib
from htmuon_jax._checks import concrete_scalar
from htmuon_jax._numerics import compute_dtype
from htmuon_jax._numerics import finite_matrices
from htmuon_jax._numerics import power_of_two_normalize
from htmuon_jax._numerics import restore_non_finite


DEFAULT_EPS = 1e-4

# fn(s, power, eps): the value that replaces each singular value.
ValuesFn = Callable[[jax.Array, Any, Any], jax.Array]


def keep_mask(s: jax.Array, eps: Any) -> jax.Array:
  """Mask of singular values above the cutoff `eps * s_max`."""
  s_max = jnp.max(s, axis=-1, keepdims=True)
  return s > eps * s_max


def powered_singular_values(s: jax.Array, power: Any, eps: Any) -> jax.Array:
  """`s**power` with the package's tiny-singular-value rule applied."""
  keep = keep_mask(s, eps)
  return jnp.where(keep, jnp.where(keep, s, 1.0) ** power, 0.0)


def rank_singular_values(s: jax.Array, power: Any, eps: Any) -> jax.Array:
  """The authors' rank spectrum: `i**-power` for the i-th largest kept
  singular value (any order, ties by position), 0 for the rest."""
  keep = keep_mask(s, eps)
  rank = jnp.argsort(jnp.argsort(-s, axis=-1), axis=-1) + 1
  return jnp.where(keep, rank.astype(s.dtype) ** -power, 0.0)


SPECTRA: Mapping[str, ValuesFn] = {
  "power": powered_singular_values,
  "rank": rank_singular_values,
}


@sharding_lib.per_matrix_state("state")
class MethodState(NamedTuple):
  """A stateful method's state, per matrix leaf (`MaskedNode` elsewhere)."""

  state: Any


@dataclasses.dataclass(frozen=True)
class SpectralMethod:
  """Base class of the spectral methods (subclass it as a frozen dataclass).

  Subclasses set the class attributes and override `apply` (and `init` when
  `stateful`); their dataclass fields are the method's own options.

  Attributes:
    name: the method's name, its shortcut `method="name"` once registered.
    stateful: whether it keeps a per-matrix state across steps.
    ordered: whether it sees each singular value (so `spectrum="rank"`
      works).
    static_power: whether `power` and `eps` must be concrete numbers.
    state_type: the one-field NamedTuple wrapping the per-matrix state tree
      in `scale_by_method`'s state (stateful methods).
    keyword_options: `{keyword: field}`: the keywords of `spectral_power`
      and the transformations (e.g. `ns_steps`) that set this method's
      options when it is given by name.
    sanitizes_non_finite: whether `run_method` zeros each non-finite matrix
      before `apply` (needed for LAPACK); its result is NaN either way.
  """

  name: ClassVar[str] = ""
  stateful: ClassVar[bool] = False
  ordered: ClassVar[bool] = False
  static_power: ClassVar[bool] = False
  state_type: ClassVar[type] = MethodState
  keyword_options: ClassVar[Mapping[str, str]] = {}
  sanitizes_non_finite: ClassVar[bool] = True

  def resolve(self, power: Any, eps: Any, spectrum: str) -> SpectralMethod:
    """The method that actually runs (`"auto"` picks one); default: itself."""
    del power, eps, spectrum
    return self

  def __post_init__(self) -> None:
    # Options are validated once, when the object is made.
    self.check_options()

  def check_options(self) -> None:
    """Raises ValueError for invalid options (fields); runs when made."""

  def validate(self, power: Any, eps: Any, spectrum: str) -> None:
    """Raises ValueError for arguments this method cannot take (the base
    checks `spectrum`); called at construction and on each call."""
    del power, eps
    if spectrum not in SPECTRA:
      raise ValueError(
        f"spectrum: unknown value {spectrum!r}; expected one of "
        f"{tuple(SPECTRA)}."
      )
    if spectrum == "rank" and not self.ordered:
      raise ValueError(
        f'spectrum="rank" needs the ordered singular values, which '
        f"method={self.name!r} does not compute; use a method that sees "
        "them (e.g. 'svd', 'eigh', 'stream')."
      )

  def prepare(self, power: Any, eps: Any) -> None:
    """Construction-time work (e.g. designing coefficients) for `power`
    and `eps` (skipped when traced); raises ValueError if it cannot."""
    del power, eps

  def init(self, shape: tuple[int, ...]) -> Any:
    """The per-matrix state of a `(..., m, n)` stack (stateless: None)."""
    del shape

  def explain_state_mismatch(
    self, got: tuple[int, ...], want: tuple[int, ...]
  ) -> str:
    """Why a per-matrix state of shape `got` is not this method's `want`
    (stateful methods name the option that differs, e.g. `rank`)."""
    return (
      f"made for other options of method={self.name!r} or other parameters"
      f" (state {got}, this optimizer's {want})"
    )

  def apply(
    self, x: jax.Array, state: Any, power: Any, eps: Any, values: ValuesFn
  ) -> tuple[jax.Array, Any]:
    """`U diag(values(s, power, eps)) V^T` of `x`, and the new state.

    Args:
      x: `(..., m, n)` matrices in the input's dtype, scaled by a power of
        two so that each matrix's largest entry lies in [0.5, 1) (methods
        that compute in float32 upcast it themselves).
      state: the per-matrix state (None for stateless methods).
      power: the exponent; traced unless `static_power`.
      eps: the relative cutoff; traced unless `static_power`.
      values: the spectrum (`powered_singular_values` or
        `rank_singular_values`; only the latter for `ordered` methods).

    Returns:
      `(out, new_state)`: `out` of `x`'s shape in any float dtype.
    """
    raise NotImplementedError


def check_static(method: str, power: Any, eps: Any) -> None:
  """ValueError for a traced `power` or `eps` (`static_power` methods)."""
  for value, name in ((power, "power"), (eps, "eps")):
    if concrete_scalar(value, name) is None:
      raise ValueError(
        f"{name}: method={method!r} needs a concrete {name}, got a "
        "traced value. Pass a Python number; under "
        f"optax.inject_hyperparams list it in static_args, e.g. "
        f"static_args=({name!r},)."
      )


def run_method(
  method: SpectralMethod,
  x: jax.Array,
  state: Any,
  power: Any,
  eps: Any = DEFAULT_EPS,
  spectrum: str = "power",
) -> tuple[jax.Array, Any]:
  """Runs `method` on `(..., m, n)` matrices: the steps every method shares.

  Each matrix is divided by a power of two (exact) so its largest entry lies
  in [0.5, 1), and `U f(S) V^T` is scaled back by `2^(e * power)`. A
  stateless method at a concrete `power == 1` returns `x` itself. A matrix
  holding a NaN or an Inf never reaches the method: its result is NaN and
  its state is kept; so is every result for a traced `power` outside
  [0, 1] or `eps` outside [0, 1) (it cannot raise under `jit`). Zero-size
  matrices give an empty result.

  Args:
    method: a resolved method (see `SpectralMethod.resolve`).
    x: the matrices.
    state: the method's per-matrix state (None if stateless).
    power: exponent in [0, 1].
    eps: relative cutoff.
    spectrum: `"power"` or `"rank"`.

  Returns:
    `(out, new_state)`, `out` with the shape and dtype of `x`.

  Raises:
    ValueError: for an `x` that is not floating point, or a traced `power`
      or `eps` with a `static_power` method.
  """
  method = method.resolve(power, eps, spectrum)
  if method.static_power:
    check_static(method.name, power, eps)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    raise ValueError(
      f"x: spectral methods need a floating-point array, got dtype "
      f"{x.dtype} (an integer matrix has no meaningful U S^p V^T; cast it "
      "first)."
    )
  if x.size == 0:
    return jnp.zeros_like(x), state  # No singular values: the zero update.
  p = concrete_scalar(power, "power")
  if not method.stateful and spectrum == "power" and p == 1.0:
    return x, state  # U S V^T itself: momentum SGD, no work, no cutoff.
  if method.sanitizes_non_finite:
    safe, finite = finite_matrices(x)
  else:
    safe = x
    finite = jnp.all(jnp.isfinite(x), axis=(-2, -1), keepdims=True)
  scaled, exponent = power_of_two_normalize(safe)
  out, new_state = method.apply(scaled, state, power, eps, SPECTRA[spectrum])
  if spectrum == "power" and p != 0.0:
    real = jnp.real(out.astype(compute_dtype(out.dtype))).dtype
    out = out.astype(compute_dtype(out.dtype)) * jnp.exp2(
      exponent.astype(real) * power
    )
  if p is None or concrete_scalar(eps, "eps") is None:
    # Traced hyperparameters cannot raise: out of [0, 1] / [0, 1) (or NaN)
    # gives NaN and a kept state, never silently another setting.
    pw, ep = jnp.asarray(power), jnp.asarray(eps)
    finite = finite & (pw >= 0) & (pw <= 1) & (ep >= 0) & (ep < 1)
  out = restore_non_finite(out, finite)
  if method.stateful:
    # A non-finite matrix keeps its state (e.g. the streaming basis).
    batch = finite[..., 0, 0]
    keep = lambda new, old: jnp.where(
      batch.reshape(batch.shape + (1,) * (new.ndim - batch.ndim)), new, old
    )
    new_state = jax.tree.map(keep, new_state, state)
  return out.astype(x.dtype), new_state


_FIX = (
  "re-initialize the state with this optimizer (opt.init(params)), or "
  "build the optimizer with the options the state was made with"
)


def check_state(
  method: SpectralMethod,
  state: Any,
  updates: Any,
  init_fn: Callable[[Any], Any] | None,
) -> None:
  """ValueError, naming what differs, unless `state` has the type, tree and
  shapes `init_fn(updates)` makes (`init_fn` None: stateless); trace time."""
  if not method.stateful or init_fn is None:
    if jax.tree.leaves(state):
      raise ValueError(
        f"state: method={method.name!r} keeps no state, but got "
        f"{type(state).__name__} holding arrays (made for a stateful "
        f"method, e.g. method='stream'); {_FIX}."
      )
    return
  if not isinstance(state, method.state_type):
    raise ValueError(
      f"state: method={method.name!r} expects a "
      f"{method.state_type.__name__}, got {type(state).__name__} (made "
      f"for another method, e.g. 'svd'); {_FIX}."
    )
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  want = jax.eval_shape(init_fn, jax.tree.map(abstract, updates))
  got_tree, want_tree = jax.tree.structure(state), jax.tree.structure(want)
  if not got_tree == want_tree:  # type: ignore[operator]
    raise ValueError(
      f"state: the {type(state).__name__}'s tree does not match this "
      f"optimizer's (made for other parameters or weight_dimension_numbers):"
      f" got {got_tree}, expected {want_tree}; {_FIX}."
    )
  got_leaves = jax.tree_util.tree_leaves_with_path(state)
  for (path, got), want_leaf in zip(got_leaves, jax.tree.leaves(want)):
    if tuple(got.shape) != tuple(want_leaf.shape):
      why = method.explain_state_mismatch(
        tuple(got.shape), tuple(want_leaf.shape)
      )
      raise ValueError(
        f"state{jax.tree_util.keystr(path)}: shape {tuple(got.shape)} is "
        f"not this optimizer's {tuple(want_leaf.shape)}: {why}; {_FIX}."
      )
