"""Ready-to-use optimizers: matrices to a spectral method, the rest to AdamW."""

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import chex
import optax

from htmuon_jax import _checks as checks
from htmuon_jax import _dimension_numbers as dn
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

  The dimension numbers are resolved on the whole tree (the default routing
  infers stacked layers from sibling leaves), then both branches run in an
  `optax.partition`, whose state this is.

  Args:
    matrix_transform: builds the matrix branch from a callable returning
      the matrix leaves' dimension numbers in `optax.partition`'s masked
      tree.
    other_transform: the transformation of the other leaves (e.g. AdamW).
    weight_dimension_numbers: `None` (the default routing of
      `resolve_dimension_numbers`), or a tree / callable of
      `MuonDimensionNumbers | None`; `None` entries go to `other_transform`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.
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
  """`htmuon`'s keywords after `learning_rate`, with their defaults.

  The one declaration of the keywords shared by the aliases on HTMuon's step
  (documented in `htmuon`; `htnormuon`, `htadamuon` take them as
  `**keywords`, `muon` and `rmnp` fill in theirs).
  """

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


# Keywords removed in 0.2.0 and their new form (CHANGELOG's migration table).
_IN_CHAIN = "htmuon_jax.scale_by_htmuon(..., {}=...) in your own chain"
REMOVED_KEYWORDS = {
  "rank": "method=htmuon_jax.methods.Stream(rank=...)",
  "stream_qr": "method=htmuon_jax.methods.Stream(qr=...)",
  "stream_side": "method=htmuon_jax.methods.Stream(side=...)",
  "precision": (
    "method=htmuon_jax.methods.Polynomial(precision=...) (or "
    "methods.NewtonSchulz(precision=...), methods.Auto(precision=...))"
  ),
  "interval_method": _IN_CHAIN.format("interval_method")
  + " (docs/composing.md)",
  "interval_first": _IN_CHAIN.format("interval_first") + " (docs/composing.md)",
  "bias_correction": _IN_CHAIN.format("bias_correction")
  + " (docs/composing.md has the HTMuon authors' optimizer)",
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


def _removed(alias: str) -> dict[str, str]:
  return REMOVED_KEYWORDS | (_MUON_ONLY_REMOVED if alias == "muon" else {})


def reject_removed_keywords(alias: str, given: Mapping[str, Any]) -> None:
  """TypeError for any keyword in `given`, naming a removed one's new form."""
  if given:
    moved = _removed(alias)
    raise TypeError(
      f"{alias}(): "
      + "; ".join(
        f"{k}= was removed in htmuon_jax 0.2.0: use {moved[k]}"
        if k in moved
        else f"got an unexpected keyword argument {k!r}"
        for k in given
      )
      + "."
    )


def shared_keywords(
  alias: str, power: chex.Numeric, keywords: Mapping[str, Any]
) -> HTMuonKeywords:
  """`HTMuonKeywords` from an alias's `power` and `**keywords`; TypeError for
  a keyword `htmuon` does not take."""
  fields = {f.name for f in dataclasses.fields(HTMuonKeywords)}
  reject_removed_keywords(
    alias, {k: v for k, v in keywords.items() if k not in fields}
  )
  return HTMuonKeywords(power=power, **keywords)


def rejects_removed_keywords(
  alias: Callable[..., optax.GradientTransformationExtraArgs],
) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """Makes an alias raise a TypeError naming a removed keyword's new form;
  its signature (what `optax.inject_hyperparams` binds) is unchanged."""
  moved = _removed(alias.__name__)

  @functools.wraps(alias)
  def checked(
    *args: Any, **kwargs: Any
  ) -> optax.GradientTransformationExtraArgs:
    reject_removed_keywords(
      alias.__name__, {k: v for k, v in kwargs.items() if k in moved}
    )
    return alias(*args, **kwargs)

  return checked


def with_htmuon_keywords(
  alias: Callable[..., optax.GradientTransformationExtraArgs],
) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """Gives an alias written as `(own keywords, **keywords)` the signature
  `inspect`, `help` and `optax.inject_hyperparams` see: its own parameters,
  then `HTMuonKeywords`' fields (checked in `shared_keywords`)."""
  own = list(inspect.signature(alias).parameters.values())[:-1]
  taken = {p.name for p in own}
  shared = [
    inspect.Parameter(
      f.name,
      inspect.Parameter.KEYWORD_ONLY,
      default=f.default,
      annotation=f.type,
    )
    for f in dataclasses.fields(HTMuonKeywords)
    if f.name not in taken
  ]
  alias.__signature__ = inspect.signature(alias).replace(  # type: ignore[attr-defined]
    parameters=own + shared
  )
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

  For each weight matrix with gradient `G`, momentum `M <- beta M + (1 -
  beta) G` and Nesterov `N = beta M + (1 - beta) G = U diag(s) V^T`:

  .. math::
    W \leftarrow W - \eta \left( c \, U \operatorname{diag}(s^p) V^\top
      + \lambda W \right), \quad c = \sqrt{\max(1, \text{fan\_out} /
      \text{fan\_in})}.

  `p = 0` is Muon, `p = 1` momentum SGD. Other leaves go to AdamW, as in
  `optax.contrib.muon`, whose every argument this takes with the same
  meaning and default (`htmuon(lr, power=0.0, method="newton_schulz")` is
  `optax.contrib.muon(lr)`). More in [Optimizers](../optimizers.md).

  Examples:
    >>> import jax.numpy as jnp
    >>> import htmuon_jax
    >>> params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    >>> opt = htmuon_jax.htmuon(0.1, power=0.5, adam_learning_rate=1e-3)
    >>> state = opt.init(params)
    >>> grads = {"w": jnp.diag(jnp.array([4.0, 1.0])), "b": jnp.ones(2)}
    >>> updates, state = opt.update(grads, state, params)
    >>> # s ** 0.5: the direction with s = 4 moves twice as far as s = 1.
    >>> print(jnp.round(updates["w"][0, 0] / updates["w"][1, 1], 4))
    2.0

  Args:
    learning_rate: a scalar or an optax schedule.
    power: spectral exponent `p` in [0, 1]; the paper uses 0.125.
    ns_coeffs: Newton-Schulz coefficients or preset (as optax).
    ns_steps: Newton-Schulz iterations (as optax).
    beta: momentum EMA decay, in [0, 1).
    eps: AdamW's epsilon and the Newton-Schulz normalization guard (as optax).
    weight_decay: decoupled weight decay of the matrix leaves (times the
      learning rate, as optax).
    weight_decay_mask: tree or callable of booleans: the leaves that decay.
    mu_dtype: dtype of the momentum accumulators.
    method: `"auto"`, `"svd"`, `"eigh"`, `"newton_schulz"`, `"polynomial"`,
      `"express"`, `"stream"`, a registered name, or a method object with
      its options (`methods.Stream(rank=8)`); the flat `ns_*` and
      `preconditioning` keywords set a Newton-Schulz method given by name.
    spectral_eps: relative cutoff: `s <= spectral_eps * s_max` counts as 0.
    spectrum: `"power"` (`U diag(s**p) V^T`) or `"rank"` (the authors'
      `U diag(i**-p) V^T`; methods `"auto"`, `"svd"`, `"eigh"`, `"stream"`).
    interval: `None`, or `k`: the HT step on updates `k, 2k, ...` (the
      authors' rule) and Muon's Newton-Schulz `U V^T` on the others, chosen
      inside the jitted step (an injected `interval` does not recompile).
    nesterov: Nesterov momentum (both branches, as optax).
    adaptive: scale matrix updates by `<N, update>` (as optax).
    preconditioning: Newton-Schulz input scaling (as optax).
    adam_b1: AdamW's first-moment decay.
    adam_b2: AdamW's second-moment decay.
    adam_eps_root: AdamW's epsilon inside the square root.
    adam_weight_decay: AdamW's weight decay.
    adam_learning_rate: AdamW's learning rate; defaults to `learning_rate`.
    muon_weight_dimension_numbers: which leaves are matrices: `None` (2-D
      leaves and stacked layers, see [Routing](../routing.md)), or a tree or
      callable of `MuonDimensionNumbers | None` (`None`: AdamW), e.g. from
      `htmuon_jax.flax_dimension_numbers`.
    consistent_rms: `None` for `sqrt(max(1, fan_out/fan_in))` scaling, or
      `c` for `c * sqrt(max(fan_in, fan_out))`.
    distribute: `None`, where to spread the matrix work (a `Mesh`, mesh
      axis name(s), a `sharding.Distribute`), or an `htmuon_jax.Execution`
      (also the grouping and memory budget); see [Sharding](../sharding.md).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: at construction, naming the argument, for values that would
      silently harm a run (`learning_rate=None`, a negative or non-finite
      learning rate, ...; listed in
      [Reliability](../reliability.md#guarding-a-run-argument-checks)).
    TypeError: for a keyword removed in 0.2.0, naming its new form.

  Warns:
    UserWarning: for flat Newton-Schulz keywords where none runs.

  References:
    Pang et al., `HTMuon: Improving Muon via Heavy-Tailed Spectral
    Correction <https://arxiv.org/abs/2603.10067>`_, 2026.
  """
  keywords = dict(locals())
  del keywords["learning_rate"]
  return spectral_optimizer(
    learning_rate, HTMuonKeywords(**keywords), htmuon_direction()
  )


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

  `htmuon(power=0.0, method="newton_schulz")`: step for step
  `optax.contrib.muon` (optax's own muon tests run against it), whose
  keywords it takes with the same meanings and defaults; only those below
  differ. Other ways to compute `U V^T` go through `htmuon(power=0.0,
  method=...)`.

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
    muon_weight_dimension_numbers: as in `htmuon` (`None` routes stacked
      layers too).
    distribute: as in `htmuon`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Jordan, `Muon <https://github.com/KellerJordan/Muon>`_, 2024.
  """
  keywords = dict(locals())
  del keywords["learning_rate"]
  shared = HTMuonKeywords(power=0.0, method="newton_schulz", **keywords)
  return spectral_optimizer(learning_rate, shared, htmuon_direction())


class SpectralSteps(NamedTuple):
  """The spectral methods of an alias, built from its keywords."""

  method: methods.SpectralMethod  # the HT step's
  interval_method: methods.SpectralMethod  # Muon's steps with interval=k


# direction(keywords, steps, dims): the matrix transformations before weight
# decay and the learning rate.
Direction = Callable[
  [HTMuonKeywords, SpectralSteps, dn.WeightDimNumOrFn],
  Sequence[optax.GradientTransformation],
]


def spectral_optimizer(
  learning_rate: optax.ScalarOrSchedule,
  keywords: HTMuonKeywords,
  direction: Direction,
) -> optax.GradientTransformationExtraArgs:
  """An alias on HTMuon's step: the flat Newton-Schulz keywords become
  method objects, `matrix_optimizer` frames `direction`, and a flat keyword
  no running method takes gives a `UserWarning`."""
  k = keywords
  flat = dict(
    ns_coeffs=k.ns_coeffs,
    ns_steps=k.ns_steps,
    preconditioning=k.preconditioning,
  )
  steps = SpectralSteps(
    methods.from_keywords(k.method, ns_eps=k.eps, **flat),
    methods.from_keywords("newton_schulz", ns_eps=k.eps, **flat),
  )
  optimizer = matrix_optimizer(
    lambda dims: direction(k, steps, dims), learning_rate, k
  )
  running = [steps.method] + [steps.interval_method] * (k.interval is not None)
  for name in methods.ignored_keywords(running, flat):
    warnings.warn(
      f"{name} is ignored with method={steps.method.name!r}: it acts only "
      f"with {methods.where_used(name)}.",
      UserWarning,
      stacklevel=3,
    )
  return optimizer


def htmuon_direction(
  between: Callable[
    [HTMuonKeywords, dn.WeightDimNumOrFn],
    Sequence[optax.GradientTransformation],
  ] = lambda k, dims: (),
) -> Direction:
  """`scale_by_htmuon`, then `between(keywords, dims)` (e.g. NorMuon's
  normalization), then `scale_by_shape`."""

  def direction(
    k: HTMuonKeywords, steps: SpectralSteps, dims: dn.WeightDimNumOrFn
  ) -> tuple[optax.GradientTransformation, ...]:
    return (
      transform.scale_by_htmuon(
        k.power,
        k.beta,
        nesterov=k.nesterov,
        mu_dtype=k.mu_dtype,
        method=steps.method,
        eps=k.spectral_eps,
        weight_dimension_numbers=dims,
        adaptive=k.adaptive,
        spectrum=k.spectrum,
        interval=k.interval,
        interval_method=steps.interval_method,
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
  """The frame of every alias, where its shared arguments are checked.

  Matrix leaves (`k.muon_weight_dimension_numbers`): `direction(dims)`, then
  `add_decayed_weights` and `scale_by_learning_rate`; other leaves
  `optax.adamw` with the `adam_*` keywords (`adam_nesterov`, if not None,
  in place of `nesterov`), as `optax.contrib.muon`. Each branch runs once
  per shape group (`shape_groups.group_leaves`, per `k.distribute`).
  """
  if learning_rate is None:
    raise ValueError(
      "learning_rate: expected a scalar or an optax schedule, got None (the "
      "update would be the raw, unscaled direction)."
    )
  checks.check_learning_rate(learning_rate, "learning_rate")
  checks.check_learning_rate(k.adam_learning_rate, "adam_learning_rate")
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

  def matrix_branch(
    dim_nums: dn.WeightDimNumOrFn,
  ) -> optax.GradientTransformation:
    return shape_groups.group_leaves(
      matrix_chain,
      dim_nums,
      k.weight_decay_mask,
      grouping=execution.grouping,
      memory_budget=execution.memory_budget,
    )

  return partition_matrices(
    matrix_branch,
    shape_groups.group_leaves(
      lambda dims, mask: adamw,
      grouping=execution.grouping,
      memory_budget=execution.memory_budget,
    ),
    k.muon_weight_dimension_numbers,
  )
