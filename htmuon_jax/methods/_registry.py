"""Method names: the registry, `Auto`, and `from_keywords`, the adapter of
optax's flat Newton-Schulz keywords (`ns_steps`, ...) to method options."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Union

import jax
import numpy as np

from htmuon_jax._checks import check_precision
from htmuon_jax.methods._base import DEFAULT_EPS
from htmuon_jax.methods._base import SpectralMethod
from htmuon_jax.methods._base import powered_singular_values
from htmuon_jax.methods._exact import Eigh
from htmuon_jax.methods._express import Express
from htmuon_jax.methods._newton_schulz import NewtonSchulz
from htmuon_jax.methods._polynomial import Polynomial
from htmuon_jax.methods._stream import Stream
from htmuon_jax.methods._exact import SVD


# What `method=` accepts: a registered name or a method object.
MethodLike = Union[str, SpectralMethod]
# What `"auto"` runs on GPU/TPU (see `Auto.resolve`).
AUTO_ACCELERATOR = "express"


@dataclasses.dataclass(frozen=True)
class Auto(SpectralMethod):
  """Picks a method for the current default backend (see `resolve`)."""

  name = "auto"
  ordered = True  # spectrum="rank" resolves to "svd".

  precision: str = "auto"

  def check_options(self) -> None:
    check_precision(self.precision)

  def validate(self, power: Any, eps: Any, spectrum: str) -> None:
    super().validate(power, eps, spectrum)
    self.check_options()

  def resolve(self, power: Any, eps: Any, spectrum: str) -> SpectralMethod:
    """CPU: `"svd"`; GPU/TPU: `"express"` at this `precision`, unless
    `power`/`eps` are traced or `spectrum="rank"` (docs/reliability.md)."""
    fast = _REGISTRY.get(AUTO_ACCELERATOR)
    if jax.default_backend() == "cpu" or fast is None or spectrum != "power":
      return _REGISTRY["svd"]
    if fast.static_power and any(
      isinstance(v, jax.core.Tracer) for v in (power, eps)
    ):
      return _REGISTRY["svd"]
    # The caller's precision (default "auto": "fast" on GPU/TPU).
    return dataclasses.replace(fast, precision=self.precision)  # type: ignore[call-arg]

  def apply(self, x, state, power, eps, values):
    spectrum = "power" if values is powered_singular_values else "rank"
    return self.resolve(power, eps, spectrum).apply(
      x, state, power, eps, values
    )


# The registry: name -> method object; built-ins listed here (no import
# side effects).
_BUILT_IN_METHODS = (Auto, SVD, Eigh, NewtonSchulz, Polynomial, Express, Stream)
_REGISTRY: dict[str, SpectralMethod] = {m.name: m() for m in _BUILT_IN_METHODS}
_BUILT_INS = tuple(_REGISTRY)


def register_method(method: SpectralMethod) -> None:
  """Registers a spectral method, so that `method=method.name` selects it.

  Args:
    method: a `htmuon_jax.methods.SpectralMethod` instance (its options are
      the defaults of the shortcut).

  Raises:
    ValueError: if `method` is not a named `SpectralMethod`.
  """
  if not isinstance(method, SpectralMethod) or not method.name:
    raise ValueError(
      f"method: expected a named htmuon_jax.methods.SpectralMethod, got "
      f"{method!r}."
    )
  _REGISTRY[method.name] = method


def unregister_method(name: str) -> None:
  """Removes a method added by `register_method` (built-ins stay).

  Raises:
    ValueError: for a built-in or an unknown name.
  """
  if name in _BUILT_INS:
    raise ValueError(f"method {name!r} is built in and cannot be removed.")
  if name not in _REGISTRY:
    raise ValueError(f"method {name!r} is not registered.")
  del _REGISTRY[name]


def method_names(
  *, stateful: bool | None = None, ordered: bool | None = None
) -> tuple[str, ...]:
  """The registered method names, in registration order.

  Args:
    stateful: if given, only the methods that are (not) stateful; e.g.
      `stateful=False` lists what `spectral_power` accepts.
    ordered: if given, only the methods that do (not) see each singular
      value (`spectrum="rank"`).
  """
  return tuple(
    n
    for n, m in _REGISTRY.items()
    if (stateful is None or m.stateful == stateful)
    and (ordered is None or m.ordered == ordered)
  )


def get_method(method: MethodLike) -> SpectralMethod:
  """The method object for `method=` (a registered name or an object).

  Raises:
    ValueError: for an unknown name.
  """
  if isinstance(method, SpectralMethod):
    return method
  if not isinstance(method, str) or method not in _REGISTRY:
    raise ValueError(
      f"method: unknown value {method!r}; expected one of "
      f"{method_names()} or a htmuon_jax.methods.SpectralMethod."
    )
  return _REGISTRY[method]


def keyword_defaults() -> dict[str, Any]:
  """Every flat keyword the registered methods declare, with its default."""
  out: dict[str, Any] = {}
  for m in _REGISTRY.values():
    for k, field in m.keyword_options.items():
      out.setdefault(k, getattr(m, field))
  return out


def _declaring(keyword: str) -> list[SpectralMethod]:
  return [m for m in _REGISTRY.values() if keyword in m.keyword_options]


def from_keywords(method: MethodLike, **keywords: Any) -> SpectralMethod:
  """A method object from `method=` and optax-style flat keywords.

  Each keyword sets the option it names (`SpectralMethod.keyword_options`)
  of a method given by name; an object keeps its own options. Every
  keyword is validated by each method that declares it, so a bad value
  raises whatever the chosen method.

  Examples:
    >>> from htmuon_jax import methods
    >>> methods.from_keywords("newton_schulz", ns_steps=3).steps
    3
    >>> methods.from_keywords("svd", ns_steps=3)  # svd has no such option
    SVD()

  Args:
    method: a registered name or a `SpectralMethod`.
    **keywords: flat keywords (`ns_coeffs`, `ns_steps`,
      `preconditioning`, `ns_eps`, or those of a registered method).

  Returns:
    A `SpectralMethod`.

  Raises:
    TypeError: for a keyword no registered method declares.
    ValueError: for an unknown name or an invalid keyword value.
  """
  for k, value in keywords.items():
    declaring = _declaring(k)
    if not declaring:
      raise TypeError(
        f"{k}: no registered method takes this keyword; known: "
        f"{sorted(keyword_defaults())}."
      )
    for m in declaring:
      dataclasses.replace(m, **{m.keyword_options[k]: value}).check_options()
  obj = get_method(method)
  if method is obj:
    return obj
  options = {
    field: keywords[k]
    for k, field in obj.keyword_options.items()
    if k in keywords
  }
  return dataclasses.replace(obj, **options) if options else obj


def _given(value: Any, default: Any) -> bool:
  """Whether a keyword's `value` differs from its `default`."""
  if isinstance(value, jax.core.Tracer):
    return False  # injected: counted as the caller's to vary
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    value = np.asarray(value).tolist()
    if isinstance(default, tuple) and isinstance(value, list):
      value = tuple(value)
  try:
    return bool(value != default)
  except (TypeError, ValueError):
    return True


def ignored_keywords(
  used: Iterable[MethodLike], keywords: Mapping[str, Any]
) -> list[str]:
  """The given keywords (not at their defaults), in order, that no method of
  `used` declares (`"auto"`: the method it resolves to on this backend)."""
  declared: set[str] = set()
  for m in used:
    obj = get_method(m)
    if isinstance(obj, Auto):
      obj = obj.resolve(0.5, DEFAULT_EPS, "power")
    declared.update(obj.keyword_options)
  defaults = keyword_defaults()
  return [
    k
    for k, v in keywords.items()
    if k not in declared and k in defaults and _given(v, defaults[k])
  ]


def where_used(keyword: str) -> str:
  """The methods that take `keyword`, as a phrase for messages."""
  names = [m.name for m in _declaring(keyword) if not isinstance(m, Auto)]
  return " or ".join(f"method={n!r}" for n in names)


def resolve_method(
  method: MethodLike, power: Any = None, eps: Any = None
) -> str:
  """The name of the method that runs for `method` (`Auto.resolve`)."""
  return get_method(method).resolve(power, eps, "power").name


def check_method(method: MethodLike, power: Any) -> SpectralMethod:
  """The method object; ValueError for a stateful method or a `power` it
  cannot take."""
  m = get_method(method)
  if m.stateful:
    raise ValueError(
      f"method={m.name!r} keeps its state across steps, so it exists only "
      "in the stateful transformations (scale_by_spectral_power, "
      "scale_by_htmuon and the aliases), not in spectral_power."
    )
  m.validate(power, DEFAULT_EPS, "power")
  return m
