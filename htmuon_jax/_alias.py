"""Ready-to-use optimizers: matrices to a spectral method, the rest to AdamW."""

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import chex
import optax

from htmuon_jax import _checks as checks
from htmuon_jax import _layouts as dn
from htmuon_jax import methods
from htmuon_jax import _shape_groups as shape_groups
from htmuon_jax import sharding as sharding_lib
from htmuon_jax import _transform as transform
from htmuon_jax.methods import _newton_schulz as ns_lib


# The branch labels of `optax.contrib.muon`, so state paths match its.
MATRIX, OTHER = "muon", "adam"


def partition_matrices(
  matrix_transform: Callable[
    [dn.WeightDimNumOrFn], optax.GradientTransformation
  ],
  other_transform: optax.GradientTransformation,
  weight_dimension_numbers: dn.WeightDimNumOrFn = None,
) -> optax.GradientTransformationExtraArgs:
  """Routes matrix leaves to one transformation and the others to another.

  Args:
    matrix_transform: builds the matrix branch from a callable giving the
      dimension numbers of `optax.partition`'s masked tree.
    other_transform: the transformation of the other leaves (e.g. AdamW).
    weight_dimension_numbers: `None` (the default routing, resolved on the
      whole tree) or a tree / callable of `MuonDimensionNumbers | None`.

  Returns:
    An `optax.GradientTransformationExtraArgs` with `optax.partition`'s state.
  """

  def partition(tree: Any) -> optax.GradientTransformationExtraArgs:
    dim_tree = dn.resolve_dimension_numbers(weight_dimension_numbers, tree)
    labels = dn.map_with_dimension_numbers(
      lambda d, _: OTHER if d is None else MATRIX, dim_tree, tree
    )
    # The matrix branch sees `MaskedNode`s in place of the other leaves.
    masked = dn.map_with_dimension_numbers(
      lambda d, _: optax.MaskedNode() if d is None else d, dim_tree, tree
    )
    # Labels as a function: a callable label tree (an Equinox module) would
    # otherwise be called by optax.
    return optax.partition(
      {MATRIX: matrix_transform(lambda _: masked), OTHER: other_transform},
      lambda _: labels,
    )

  # Built once here too, so bad hyperparameters raise at construction.
  matrix_transform(
    lambda tree: dn.resolve_dimension_numbers(weight_dimension_numbers, tree)
  )

  def init_fn(params: Any) -> Any:
    return partition(params).init(params)

  def update_fn(
    updates: Any, state: Any, params: Any = None, **extra_args: Any
  ) -> tuple[Any, Any]:
    return partition(updates).update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(frozen=True)
class HTMuonKeywords:
  """The aliases' shared keywords and defaults, declared once (`htmuon`)."""

  power: chex.Numeric = 0.125
  ns_coeffs: ns_lib.NSCoeffs = ns_lib.DEFAULT_NS_COEFFS
  ns_steps: int = 5
  beta: chex.Numeric = 0.95
  eps: chex.Numeric = 1e-8
  weight_decay: optax.ScalarOrSchedule = 0.0
  weight_decay_mask: Optional[Any] = None
  mu_dtype: Optional[Any] = None
  method: methods.MethodLike = "auto"
  spectral_eps: chex.Numeric = methods.DEFAULT_EPS
  spectrum: str = "power"
  interval: Optional[int] = None
  nesterov: bool = True
  adaptive: bool = False
  preconditioning: ns_lib.Preconditioning = "frobenius"
  adam_b1: chex.Numeric = 0.9
  adam_b2: chex.Numeric = 0.999
  adam_eps_root: chex.Numeric = 0.0
  adam_weight_decay: chex.Numeric = 0.0
  adam_learning_rate: Optional[optax.ScalarOrSchedule] = None
  muon_weight_dimension_numbers: dn.WeightDimNumOrFn = None
  consistent_rms: Optional[chex.Numeric] = None
  distribute: sharding_lib.ExecutionLike = None

  def flat_ns(self) -> dict[str, Any]:
    """optax's flat Newton-Schulz keywords."""
    names = ("ns_coeffs", "ns_steps", "preconditioning")
    return {name: getattr(self, name) for name in names}

  def spectral_method(
    self, method: Optional[methods.MethodLike] = None
  ) -> methods.SpectralMethod:
    """`method` (default `self.method`) as an object, with the flat keywords."""
    method = self.method if method is None else method
    return methods.from_keywords(method, ns_eps=self.eps, **self.flat_ns())


# Keywords removed in 0.2.0 and their new form (CHANGELOG's migration table).
REMOVED_KEYWORDS = {
  "rank": "method=htmuon_jax.methods.Stream(rank=...)",
  "stream_qr": "method=htmuon_jax.methods.Stream(qr=...)",
  "stream_side": "method=htmuon_jax.methods.Stream(side=...)",
  "precision": (
    "method=htmuon_jax.methods.Polynomial(precision=...) (or "
    "methods.NewtonSchulz(precision=...), methods.Auto(precision=...))"
  ),
  **{
    k: f"htmuon_jax.scale_by_htmuon(..., {k}=...) in your own chain "
    f"(docs/composing.md{more})"
    for k, more in (
      ("interval_method", ""),
      ("interval_first", ""),
      ("bias_correction", " has the HTMuon authors' optimizer"),
    )
  },
  "adam_nesterov": (
    "optax.adamw(..., nesterov=...) as the other branch of "
    "htmuon_jax.partition_matrices (docs/composing.md)"
  ),
}
# `muon` takes exactly optax.contrib.muon's keywords (plus `distribute`).
_MUON_ONLY_REMOVED = {
  k: f"htmuon(power=0.0, {k}=...)"
  for k in ("method", "spectral_eps", "interval")
}


def reject_removed_keywords(alias: str, given: Iterable[str]) -> None:
  """TypeError for any keyword in `given`, naming a removed one's new form."""
  moved = REMOVED_KEYWORDS | (_MUON_ONLY_REMOVED if alias == "muon" else {})
  lines = [
    f"{k}= was removed in htmuon_jax 0.2.0: use {moved[k]}"
    if k in moved
    else f"got an unexpected keyword argument {k!r}"
    for k in given
  ]
  if lines:
    raise TypeError(f"{alias}(): " + "; ".join(lines) + ".")


def shared_keywords(
  alias: str, power: chex.Numeric, keywords: Mapping[str, Any]
) -> HTMuonKeywords:
  """`HTMuonKeywords` from an alias's `power` and `**keywords`."""
  fields = {f.name for f in dataclasses.fields(HTMuonKeywords)}
  reject_removed_keywords(alias, [k for k in keywords if k not in fields])
  return HTMuonKeywords(power=power, **keywords)


def rejects_removed_keywords(
  alias: Callable[..., optax.GradientTransformationExtraArgs],
) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """Makes an alias's TypeError name a removed keyword's new form."""
  names = inspect.signature(alias).parameters

  @functools.wraps(alias)
  def checked(
    *args: Any, **kwargs: Any
  ) -> optax.GradientTransformationExtraArgs:
    reject_removed_keywords(
      alias.__name__, [k for k in kwargs if k not in names]
    )
    return alias(*args, **kwargs)

  return checked


def with_htmuon_keywords(
  alias: Callable[..., optax.GradientTransformationExtraArgs],
) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """Gives an alias `(own keywords, **keywords)` the signature of its own
  parameters then `HTMuonKeywords`' fields (for `optax.inject_hyperparams`)."""
  own = list(inspect.signature(alias).parameters.values())[:-1]
  taken = {p.name for p in own}
  kw = inspect.Parameter.KEYWORD_ONLY
  shared = [
    inspect.Parameter(f.name, kw, default=f.default, annotation=f.type)
    for f in dataclasses.fields(HTMuonKeywords)
    if f.name not in taken
  ]
  signature = inspect.signature(alias).replace(parameters=own + shared)
  alias.__signature__ = signature  # type: ignore[attr-defined]
  return alias


@rejects_removed_keywords
def htmuon(
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
  spectrum: str = "power",
  interval: Optional[int] = None,
  nesterov: bool = True,
  adaptive: bool = False,
  preconditioning: ns_lib.Preconditioning = "frobenius",
  adam_b1: chex.Numeric = 0.9,
  adam_b2: chex.Numeric = 0.999,
  adam_eps_root: chex.Numeric = 0.0,
  adam_weight_decay: chex.Numeric = 0.0,
  adam_learning_rate: Optional[optax.ScalarOrSchedule] = None,
  muon_weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  consistent_rms: Optional[chex.Numeric] = None,
  distribute: sharding_lib.ExecutionLike = None,
) -> optax.GradientTransformationExtraArgs:
  r"""HTMuon: Muon with a heavy-tailed spectral correction.

  For each weight matrix, with `N = U diag(s) V^T` the Nesterov momentum
  (`M <- beta M + (1 - beta) G`, `N = beta M + (1 - beta) G`):

  .. math::
    W \leftarrow W - \eta \left( c \, U \operatorname{diag}(s^p) V^\top
      + \lambda W \right), \quad c = \sqrt{\max(1, \text{fan\_out} /
      \text{fan\_in})}.

  `p = 0` is Muon, `p = 1` momentum SGD; other leaves go to AdamW. Every
  `optax.contrib.muon` keyword has optax's meaning and default (marked "as
  optax"): `htmuon(lr, power=0.0, method="newton_schulz")` is
  `optax.contrib.muon(lr)`. See [Optimizers](../optimizers.md).

  Examples:
    >>> import jax.numpy as jnp
    >>> import htmuon_jax
    >>> params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    >>> opt = htmuon_jax.htmuon(0.1, power=0.5, adam_learning_rate=1e-3)
    >>> grads = {"w": jnp.diag(jnp.array([4.0, 1.0])), "b": jnp.ones(2)}
    >>> updates, _ = opt.update(grads, opt.init(params), params)
    >>> # s ** 0.5: the direction with s = 4 moves twice as far as s = 1.
    >>> print(jnp.round(updates["w"][0, 0] / updates["w"][1, 1], 4))
    2.0

  Args:
    learning_rate: a scalar or an optax schedule.
    power: spectral exponent `p` in [0, 1]; the paper uses 0.125.
    ns_coeffs: Newton-Schulz coefficients or preset (as optax).
    ns_steps: Newton-Schulz iterations (as optax).
    beta: momentum EMA decay, in [0, 1).
    eps: AdamW's epsilon and the Newton-Schulz guard (as optax).
    weight_decay: decoupled weight decay of the matrix leaves (as optax).
    weight_decay_mask: tree or callable of booleans: the leaves that decay.
    mu_dtype: dtype of the momentum accumulators.
    method: a name (see `spectral_power`; also `"stream"`) or a method
      object (`methods.Stream(rank=8)`); `ns_*`, `preconditioning` set one
      given by name.
    spectral_eps: relative cutoff: `s <= spectral_eps * s_max` counts as 0.
    spectrum: `"power"`, or `"rank"` (the authors' `U diag(i**-p) V^T`).
    interval: `None`, or `k`: the HT step on updates `k, 2k, ...` (the
      authors' rule) and Muon's Newton-Schulz on the others, chosen in the
      jitted step (injectable).
    nesterov: Nesterov momentum, both branches (as optax).
    adaptive: scale matrix updates by `<N, update>` (as optax).
    preconditioning: Newton-Schulz input scaling (as optax).
    adam_b1: AdamW's first-moment decay (as optax).
    adam_b2: AdamW's second-moment decay (as optax).
    adam_eps_root: AdamW's epsilon inside the square root (as optax).
    adam_weight_decay: AdamW's weight decay (as optax).
    adam_learning_rate: AdamW's learning rate; `None`: `learning_rate`.
    muon_weight_dimension_numbers: which leaves are matrices: `None` (2-D
      leaves and stacked layers) or a tree / callable of
      `MuonDimensionNumbers | None`; see [Routing](../routing.md).
    consistent_rms: `None` for `sqrt(max(1, fan_out/fan_in))` scaling, or
      `c` for `c * sqrt(max(fan_in, fan_out))` (as optax).
    distribute: `None`, where to spread the matrix work (a `Mesh`, axis
      name(s), a `sharding.Distribute`) or an `htmuon_jax.Execution`; see
      [Sharding](../sharding.md).

  Raises:
    ValueError: at construction, naming the argument, for values that would
      silently harm a run ([Reliability](../reliability.md)).
    TypeError: for a keyword removed in 0.2.0, naming its new form.

  Warns:
    UserWarning: for flat Newton-Schulz keywords where none runs.
  """
  keywords = HTMuonKeywords(
    power=power,
    ns_coeffs=ns_coeffs,
    ns_steps=ns_steps,
    beta=beta,
    eps=eps,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    mu_dtype=mu_dtype,
    method=method,
    spectral_eps=spectral_eps,
    spectrum=spectrum,
    interval=interval,
    nesterov=nesterov,
    adaptive=adaptive,
    preconditioning=preconditioning,
    adam_b1=adam_b1,
    adam_b2=adam_b2,
    adam_eps_root=adam_eps_root,
    adam_weight_decay=adam_weight_decay,
    adam_learning_rate=adam_learning_rate,
    muon_weight_dimension_numbers=muon_weight_dimension_numbers,
    consistent_rms=consistent_rms,
    distribute=distribute,
  )
  return spectral_optimizer(learning_rate, keywords, htmuon_direction())


@rejects_removed_keywords
def muon(
  learning_rate: optax.ScalarOrSchedule,
  ns_coeffs: ns_lib.NSCoeffs = ns_lib.DEFAULT_NS_COEFFS,
  ns_steps: int = 5,
  beta: chex.Numeric = 0.95,
  eps: chex.Numeric = 1e-8,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  weight_decay_mask: Optional[Any] = None,
  mu_dtype: Optional[Any] = None,
  *,
  nesterov: bool = True,
  adaptive: bool = False,
  preconditioning: ns_lib.Preconditioning = "frobenius",
  adam_b1: chex.Numeric = 0.9,
  adam_b2: chex.Numeric = 0.999,
  adam_eps_root: chex.Numeric = 0.0,
  adam_weight_decay: chex.Numeric = 0.0,
  adam_learning_rate: Optional[optax.ScalarOrSchedule] = None,
  muon_weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  consistent_rms: Optional[chex.Numeric] = None,
  distribute: sharding_lib.ExecutionLike = None,
) -> optax.GradientTransformationExtraArgs:
  """Muon: `optax.contrib.muon`'s keywords and updates, plus `distribute`.

  `htmuon(power=0.0, method="newton_schulz")`, step for step
  `optax.contrib.muon` (optax's muon tests run against it); every keyword
  not listed below has optax's meaning and default.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import htmuon_jax
    >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    >>> grads = {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones(2)}
    >>> opt, ref = htmuon_jax.muon(0.02), optax.contrib.muon(0.02)
    >>> updates, _ = opt.update(grads, opt.init(params), params)
    >>> expected, _ = ref.update(grads, ref.init(params), params)
    >>> print(bool(jnp.allclose(updates["w"], expected["w"], atol=1e-7)))
    True

  Args:
    learning_rate: a scalar or an optax schedule.
    muon_weight_dimension_numbers: as in `htmuon` (stacked layers too).
    distribute: as in `htmuon`.
  """
  shared = HTMuonKeywords(
    power=0.0,
    method="newton_schulz",
    ns_coeffs=ns_coeffs,
    ns_steps=ns_steps,
    beta=beta,
    eps=eps,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    mu_dtype=mu_dtype,
    nesterov=nesterov,
    adaptive=adaptive,
    preconditioning=preconditioning,
    adam_b1=adam_b1,
    adam_b2=adam_b2,
    adam_eps_root=adam_eps_root,
    adam_weight_decay=adam_weight_decay,
    adam_learning_rate=adam_learning_rate,
    muon_weight_dimension_numbers=muon_weight_dimension_numbers,
    consistent_rms=consistent_rms,
    distribute=distribute,
  )
  return spectral_optimizer(learning_rate, shared, htmuon_direction())


# direction(keywords, dims): the matrix transformations before weight decay.
Direction = Callable[
  [HTMuonKeywords, dn.WeightDimNumOrFn], Sequence[optax.GradientTransformation]
]


def spectral_optimizer(
  learning_rate: optax.ScalarOrSchedule,
  keywords: HTMuonKeywords,
  direction: Direction,
) -> optax.GradientTransformationExtraArgs:
  """`matrix_optimizer(direction)`; warns for flat Newton-Schulz keywords
  that no running method takes."""
  k = keywords
  running = [k.spectral_method()]  # raises here for a bad method or keyword
  if k.interval is not None:
    running.append(k.spectral_method("newton_schulz"))
  optimizer = matrix_optimizer(
    lambda dims: direction(k, dims), learning_rate, k
  )
  for name in methods.ignored_keywords(running, k.flat_ns()):
    warnings.warn(
      f"{name} is ignored with method={running[0].name!r}: it acts only "
      f"with {methods.where_used(name)}.",
      UserWarning,
      stacklevel=3,
    )
  return optimizer


def htmuon_direction(between: Direction = lambda k, dims: ()) -> Direction:
  """`scale_by_htmuon`, then `between(keywords, dims)` (e.g. NorMuon's
  normalization), then `scale_by_shape`."""

  def direction(
    k: HTMuonKeywords, dims: dn.WeightDimNumOrFn
  ) -> tuple[optax.GradientTransformation, ...]:
    return (
      transform.scale_by_htmuon(
        k.power,
        k.beta,
        nesterov=k.nesterov,
        mu_dtype=k.mu_dtype,
        method=k.spectral_method(),
        eps=k.spectral_eps,
        weight_dimension_numbers=dims,
        adaptive=k.adaptive,
        spectrum=k.spectrum,
        interval=k.interval,
        interval_method=k.spectral_method("newton_schulz"),
        distribute=k.distribute,
      ),
      *between(k, dims),
      transform.scale_by_shape(
        weight_dimension_numbers=dims, consistent_rms=k.consistent_rms
      ),
    )

  return direction


def matrix_optimizer(
  direction: Callable[
    [dn.WeightDimNumOrFn], Sequence[optax.GradientTransformation]
  ],
  learning_rate: optax.ScalarOrSchedule,
  k: HTMuonKeywords,
  adam_nesterov: Optional[bool] = None,
) -> optax.GradientTransformationExtraArgs:
  """Every alias's frame (shared arguments checked here): matrix leaves get
  `direction(dims)`, weight decay and the learning rate, others AdamW."""
  checks.check_learning_rate(learning_rate, "learning_rate")
  checks.check_learning_rate(
    k.adam_learning_rate, "adam_learning_rate", optional=True
  )
  checks.check_range(k.beta, "beta", 0.0, 1.0, high_open=True)
  checks.check_mu_dtype(k.mu_dtype)
  execution = sharding_lib.as_execution(k.distribute)

  def matrix_chain(dims: Any, mask: Any) -> optax.GradientTransformation:
    return optax.chain(
      *direction(dims),
      optax.add_decayed_weights(k.weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
    )

  adamw = optax.adamw(
    learning_rate=(
      learning_rate if k.adam_learning_rate is None else k.adam_learning_rate
    ),
    b1=k.adam_b1,
    b2=k.adam_b2,
    eps=k.eps,
    eps_root=k.adam_eps_root,
    weight_decay=k.adam_weight_decay,
    mu_dtype=k.mu_dtype,
    nesterov=k.nesterov if adam_nesterov is None else adam_nesterov,
  )

  group = functools.partial(shape_groups.group_leaves, execution=execution)
  return partition_matrices(
    lambda dims: group(matrix_chain, dims, k.weight_decay_mask),
    group(lambda dims, mask: adamw),
    k.muon_weight_dimension_numbers,
  )
