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
  infers stacked layers from sibling leaves, which the matrix branch's
  masked tree no longer shows), then both branches run in an
  `optax.partition`; the state is `optax.partition`'s.

  Args:
    matrix_transform: builds the matrix branch from a dimension-number
      callable (to be passed on to the spectral pieces), which returns the
      dimension numbers of the matrix leaves in `optax.partition`'s masked
      tree layout.
    other_transform: the transformation for non-matrix leaves (e.g. AdamW).
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
    # The matrix branch sees `MaskedNode`s in place of the other leaves;
    # `resolve_dimension_numbers` keeps a MaskedNode prefix as it is.
    masked = dn.map_with_dimension_numbers(
      lambda d, _: optax.MaskedNode() if d is None else d, dim_tree, tree
    )
    # `labels` is passed as a function: a label tree that is itself callable
    # (an Equinox module) would otherwise be called as one by optax.
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
  """The keywords of `htmuon` after `learning_rate`, with its defaults.

  The one typed declaration of the keywords that the aliases built on
  HTMuon's step share: `htnormuon` and `htadamuon` write out only their own
  keywords and take these as `**keywords`. Each is documented in `htmuon`;
  `tests/test_alias.py` checks that `htmuon`'s signature and this class
  agree.
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


# Keywords removed in 0.2.0, with their new form (CHANGELOG's migration
# table): passing one raises a TypeError that says where it went.
REMOVED_KEYWORDS = {
  "rank": "method=htmuon_jax.methods.Stream(rank=...)",
  "stream_qr": "method=htmuon_jax.methods.Stream(qr=...)",
  "stream_side": "method=htmuon_jax.methods.Stream(side=...)",
  "precision": (
    "method=htmuon_jax.methods.Polynomial(precision=...) (or "
    "methods.NewtonSchulz(precision=...), methods.Auto(precision=...))"
  ),
  "interval_method": (
    "htmuon_jax.scale_by_htmuon(..., interval_method=...) in your own chain "
    "(docs/composing.md)"
  ),
  "interval_first": (
    "htmuon_jax.scale_by_htmuon(..., interval_first=...) in your own chain "
    "(docs/composing.md)"
  ),
  "bias_correction": (
    "htmuon_jax.scale_by_htmuon(..., bias_correction=...) in your own chain "
    "(docs/composing.md has the HTMuon authors' optimizer)"
  ),
  "adam_nesterov": (
    "optax.adamw(..., nesterov=...) as the other branch of "
    "htmuon_jax.partition_matrices (docs/composing.md)"
  ),
}
# `muon` takes exactly optax.contrib.muon's keywords (plus `distribute`).
_MUON_ONLY_REMOVED = {
  "method": "htmuon(power=0.0, method=...)",
  "spectral_eps": "htmuon(power=0.0, spectral_eps=...)",
  "interval": "htmuon(power=0.0, interval=...)",
}


def reject_removed_keywords(alias: str, given: Mapping[str, Any]) -> None:
  """Raises a TypeError naming the new form of a removed keyword.

  Args:
    alias: the alias's name, for the message.
    given: the keywords that its signature did not take.

  Raises:
    TypeError: for any keyword in `given`.
  """
  if not given:
    return
  moved = dict(REMOVED_KEYWORDS)
  if alias == "muon":
    moved.update(_MUON_ONLY_REMOVED)
  lines = [
    f"{k}= was removed in htmuon_jax 0.2.0: use {moved[k]}"
    if k in moved
    else f"got an unexpected keyword argument {k!r}"
    for k in given
  ]
  raise TypeError(f"{alias}(): " + "; ".join(lines) + ".")


def shared_keywords(
  alias: str, power: chex.Numeric, keywords: Mapping[str, Any]
) -> HTMuonKeywords:
  """`HTMuonKeywords` from an alias's `power` and `**keywords`.

  Raises:
    TypeError: for a keyword that `htmuon` does not take (a removed one
      names its new form).
  """
  fields = {f.name for f in dataclasses.fields(HTMuonKeywords)}
  reject_removed_keywords(
    alias, {k: v for k, v in keywords.items() if k not in fields}
  )
  return HTMuonKeywords(power=power, **keywords)


def rejects_removed_keywords(
  alias: Callable[..., optax.GradientTransformationExtraArgs],
) -> Callable[..., optax.GradientTransformationExtraArgs]:
  """Makes an alias raise a `TypeError` naming the new form of a keyword
  removed in 0.2.0 (its signature, seen through `functools.wraps`, is
  unchanged: `optax.inject_hyperparams` binds it as written)."""
  moved = set(REMOVED_KEYWORDS) | (
    set(_MUON_ONLY_REMOVED) if alias.__name__ == "muon" else set()
  )

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
  """Gives an alias written as `(own keywords, **keywords)` its full
  signature: its own parameters, then `HTMuonKeywords`' fields.

  The signature is what `inspect.signature`, `help` and
  `optax.inject_hyperparams` see, so every shared keyword is bound by name
  (and a numeric one injected) as in `htmuon`; the values still arrive in
  `**keywords` and are checked there (`shared_keywords`).
  """
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

  For each weight matrix (2-D leaves, stacked layers as batches of
  matrices, or per `muon_weight_dimension_numbers`) with gradient `G`,
  momentum `M <- beta M + (1 - beta) G` and Nesterov
  `N = beta M + (1 - beta) G = U diag(s) V^T`:

  .. math::
    W \leftarrow W - \eta \left( c \, U \operatorname{diag}(s^p) V^\top
      + \lambda W \right), \quad c = \sqrt{\max(1, \text{fan\_out} /
      \text{fan\_in})}.

  `p = 0` is Muon and `p = 1` momentum SGD; HTMuon is steepest descent under
  the Schatten-`q` norm with `q = 1 + 1/p`. Every other leaf is optimized by
  AdamW, exactly as in `optax.contrib.muon`. The function accepts every
  argument of `optax.contrib.muon` (optax 0.2.8) with the same meaning and
  default, so `htmuon(lr, power=0.0, method="newton_schulz")` reproduces
  `optax.contrib.muon(lr)`; HTMuon's own keywords are `power`, `method`,
  `spectral_eps`, `spectrum`, `interval` and `distribute`. A method's options
  live on its object (`methods.Stream(rank=8)`,
  `methods.Polynomial(precision="fast")`); optax's Newton-Schulz keywords
  stay flat, as in optax.

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
      `"stream"`, a registered name, or a method object with its options
      (e.g. `htmuon_jax.methods.Stream(rank=8, qr="cholesky")`,
      `methods.Polynomial(precision="accurate")`); see `spectral_power`.
      The flat `ns_*` and `preconditioning` keywords set a Newton-Schulz
      method given by name; an object keeps its own.
    spectral_eps: relative cutoff for tiny singular values: `s <= spectral_eps
      * s_max` counts as zero.
    nesterov: Nesterov momentum (both branches, as in optax).
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
      biases or norms (`htmuon_jax.flax_dimension_numbers` builds it).
    consistent_rms: `None` for `sqrt(max(1, fan_out/fan_in))` scaling, or a
      float `c` for `c * sqrt(max(fan_in, fan_out))`.
    distribute: how the matrix work runs. `None` (default), or where to run
      the distributed spectral step (a `Mesh`, mesh axis name(s), or a
      `htmuon_jax.sharding.Distribute`): matrices of equal shape are spread
      whole over the devices, one all-to-all in and one out; see
      `htmuon_jax.sharding`. An `htmuon_jax.Execution(distribute=...,
      grouping=..., memory_budget=...)` also sets which equal-shape leaves
      share one traced step and the memory of a chunk of them (fixed when
      the optimizer is built).
    spectrum: `"power"` (`U diag(s**p) V^T`) or `"rank"`, the authors'
      rank-based `U diag(i**-p) V^T` (methods `"auto"`, `"svd"`, `"eigh"`,
      `"stream"`).
    interval: `None`, or `k`: the HT step on updates `k, 2k, ...` (the
      authors' rule), Muon's Newton-Schulz `U V^T` (the `ns_*` keywords) on
      the others, selected inside the jitted step; an injected `interval`
      does not recompile (see `scale_by_htmuon` for other choices).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: at construction, naming the argument, for values that would
      silently harm a run: `learning_rate=None`, a negative or non-finite
      `learning_rate` or `adam_learning_rate` (a schedule at step 0), a negative
      `consistent_rms`, an integer `mu_dtype`, an `ns_steps` that is not a
      positive int (a traced, injected one is not checked), a non-bool
      `adaptive`, and out-of-range `power`, `beta`, `spectral_eps`.
    TypeError: for a keyword removed in 0.2.0 (`rank`, `stream_qr`,
      `stream_side`, `precision`, `interval_method`, `interval_first`,
      `bias_correction`, `adam_nesterov`), naming its new form.

  Warns:
    UserWarning: for flat Newton-Schulz keywords (`preconditioning`,
      `ns_steps`, `ns_coeffs`) given where no Newton-Schulz step runs.

  References:
    Pang et al., `HTMuon: Improving Muon via Heavy-Tailed Spectral
    Correction <https://arxiv.org/abs/2603.10067>`_, 2026.

    Jordan, `Muon <https://github.com/KellerJordan/Muon>`_, 2024.
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


class SpectralSteps(NamedTuple):
  """The spectral methods of an alias, built from its keywords."""

  method: methods.SpectralMethod  # the HT step's
  interval_method: methods.SpectralMethod  # Muon's steps with interval=k


# direction(keywords, steps, dims): the matrix branch's transformations
# before weight decay and the learning rate.
Direction = Callable[
  [HTMuonKeywords, SpectralSteps, dn.WeightDimNumOrFn],
  Sequence[optax.GradientTransformation],
]


def spectral_optimizer(
  learning_rate: optax.ScalarOrSchedule,
  keywords: HTMuonKeywords,
  direction: Direction,
) -> optax.GradientTransformationExtraArgs:
  """An alias on HTMuon's step: validation, methods, the frame, warnings.

  The one place where an alias's keywords are validated and its optax-style
  flat Newton-Schulz keywords (`ns_coeffs`, `ns_steps`, `preconditioning`,
  and `eps` as the normalization guard) become method objects
  (`methods.from_keywords`); the HT step runs `keywords.method`, the steps
  between HT steps (`interval=k`) Muon's Newton-Schulz. A flat keyword that
  no running method takes is reported with a `UserWarning`.

  Args:
    learning_rate: the matrices' learning rate (a scalar or a schedule).
    keywords: the alias's `HTMuonKeywords`.
    direction: builds the matrix branch's direction.

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  k = keywords
  checks.check_learning_rates(learning_rate, k.adam_learning_rate)
  checks.check_range(k.beta, "beta", 0.0, 1.0, high_open=True)
  flat = {
    "ns_coeffs": k.ns_coeffs,
    "ns_steps": k.ns_steps,
    "preconditioning": k.preconditioning,
  }
  steps = SpectralSteps(
    methods.from_keywords(k.method, ns_eps=k.eps, **flat),
    methods.from_keywords("newton_schulz", ns_eps=k.eps, **flat),
  )
  running = [steps.method] + (
    [steps.interval_method] * (k.interval is not None)
  )
  optimizer = matrix_optimizer(
    lambda dims: direction(k, steps, dims),
    learning_rate,
    weight_decay=k.weight_decay,
    weight_decay_mask=k.weight_decay_mask,
    eps=k.eps,
    mu_dtype=k.mu_dtype,
    nesterov=k.nesterov,
    adam_b1=k.adam_b1,
    adam_b2=k.adam_b2,
    adam_eps_root=k.adam_eps_root,
    adam_weight_decay=k.adam_weight_decay,
    adam_learning_rate=k.adam_learning_rate,
    muon_weight_dimension_numbers=k.muon_weight_dimension_numbers,
    execution=sharding_lib.as_execution(k.distribute),
  )
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
  """HTMuon's direction: `scale_by_htmuon`, `between`, `scale_by_shape`.

  Args:
    between: the transformations after the spectral step (e.g. NorMuon's
      normalization), given the keywords and the dimension numbers.

  Returns:
    A `Direction` for `spectral_optimizer`.
  """

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

  `U V^T` of the momentum per matrix by Muon's Newton-Schulz iteration,
  step for step as `optax.contrib.muon` (tests/test_optax_suites.py runs
  optax's own muon tests against it). It is `htmuon(power=0.0,
  method="newton_schulz")`; other ways to compute `U V^T` (the exact
  `method="svd"`, `"polynomial"`, `"stream"`) go through
  `htmuon(power=0.0, method=...)`.

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
    ns_coeffs: Newton-Schulz coefficients or preset.
    ns_steps: Newton-Schulz iterations.
    beta: momentum EMA decay, in [0, 1).
    eps: AdamW's epsilon and the Newton-Schulz normalization guard.
    weight_decay: decoupled weight decay of the matrix leaves.
    weight_decay_mask: tree or callable of booleans selecting the leaves that
      decay.
    mu_dtype: dtype of the momentum accumulators.
    nesterov: Nesterov momentum (both branches, as in optax).
    adaptive: scale matrix updates by `<N, update>` (optax's flag).
    preconditioning: Newton-Schulz input scaling.
    adam_b1: AdamW's first-moment decay.
    adam_b2: AdamW's second-moment decay.
    adam_eps_root: AdamW's epsilon inside the square root.
    adam_weight_decay: AdamW's weight decay.
    adam_learning_rate: AdamW's learning rate; defaults to `learning_rate`.
    muon_weight_dimension_numbers: which leaves are matrices (see `htmuon`).
    consistent_rms: `None` for `sqrt(max(1, fan_out/fan_in))` scaling, or a
      float `c` for `c * sqrt(max(fan_in, fan_out))`.
    distribute: where to run the distributed spectral step (see `htmuon`).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Jordan, `Muon <https://github.com/KellerJordan/Muon>`_, 2024.
  """
  keywords = HTMuonKeywords(
    power=0.0,
    ns_coeffs=ns_coeffs,
    ns_steps=ns_steps,
    beta=beta,
    eps=eps,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    mu_dtype=mu_dtype,
    method="newton_schulz",
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


def matrix_optimizer(
  direction: Callable[
    [dn.WeightDimNumOrFn], Sequence[optax.GradientTransformation]
  ],
  learning_rate: optax.ScalarOrSchedule,
  *,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  weight_decay_mask: Optional[Any] = None,
  eps: chex.Numeric = 1e-8,
  mu_dtype: Optional[Any] = None,
  nesterov: bool = True,
  adam_b1: chex.Numeric = 0.9,
  adam_b2: chex.Numeric = 0.999,
  adam_eps_root: chex.Numeric = 0.0,
  adam_weight_decay: chex.Numeric = 0.0,
  adam_learning_rate: Optional[optax.ScalarOrSchedule] = None,
  muon_weight_dimension_numbers: dn.WeightDimNumOrFn = None,
  adam_nesterov: Optional[bool] = None,
  execution: sharding_lib.Execution = sharding_lib.DEFAULT_EXECUTION,
) -> optax.GradientTransformationExtraArgs:
  """The frame of every alias: matrices follow `direction`, the rest AdamW.

  Matrix leaves: `direction(dims)` (a sequence of transformations, given the
  masked dimension-number callable), then `add_decayed_weights(weight_decay,
  weight_decay_mask)` and `scale_by_learning_rate(learning_rate)`. Other
  leaves: `optax.adamw` with the `adam_*` arguments, as `optax.contrib.muon`.

  Args:
    direction: builds the matrix branch's direction from dimension numbers.
    learning_rate: a scalar or an optax schedule.
    weight_decay: decoupled weight decay of the matrix leaves.
    weight_decay_mask: tree or callable of booleans selecting the leaves that
      decay.
    eps: AdamW's epsilon.
    mu_dtype: dtype of AdamW's first moment.
    nesterov: AdamW's Nesterov flag (the matrix momentum's, in the aliases).
    adam_b1: AdamW's first-moment decay.
    adam_b2: AdamW's second-moment decay.
    adam_eps_root: AdamW's epsilon inside the square root.
    adam_weight_decay: AdamW's weight decay.
    adam_learning_rate: AdamW's learning rate; defaults to `learning_rate`.
    muon_weight_dimension_numbers: which leaves are matrices (see `htmuon`).
    adam_nesterov: AdamW's Nesterov flag if not `None` (overrides
      `nesterov`).
    execution: how equal-shape leaves share one traced chain (its
      `grouping` and `memory_budget`; see `shape_groups.group_leaves`).

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  if learning_rate is None:
    raise ValueError(
      "learning_rate: expected a scalar or an optax schedule, got None (the "
      "update would be the raw, unscaled direction)."
    )
  transform.check_mu_dtype(mu_dtype)
  if adam_nesterov is not None:
    nesterov = adam_nesterov
  if adam_learning_rate is None:
    adam_learning_rate = learning_rate

  def matrix_chain(dims: Any, mask: Any) -> optax.GradientTransformation:
    return optax.chain(
      *direction(dims),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
    )

  # Each branch is traced once per shape group of its leaves (on one
  # accelerator device by default; see `shape_groups`).
  def matrix_branch(
    dim_nums: dn.WeightDimNumOrFn,
  ) -> optax.GradientTransformation:
    return shape_groups.group_leaves(
      matrix_chain,
      dim_nums,
      weight_decay_mask,
      execution=execution,
    )

  adamw = optax.adamw(
    learning_rate=adam_learning_rate,
    b1=adam_b1,
    b2=adam_b2,
    eps=eps,
    eps_root=adam_eps_root,
    weight_decay=adam_weight_decay,
    mu_dtype=mu_dtype,
    nesterov=nesterov,
  )
  return partition_matrices(
    matrix_branch,
    shape_groups.group_leaves(
      lambda dims, mask: adamw,
      execution=execution,
    ),
    muon_weight_dimension_numbers,
  )
