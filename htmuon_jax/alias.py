"""Ready-to-use optimizers: matrices to a spectral method, the rest to AdamW."""

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import chex
import optax

from htmuon_jax import checks
from htmuon_jax import dimension_numbers as dn
from htmuon_jax import methods
from htmuon_jax import shape_groups
from htmuon_jax import sharding as sharding_lib
from htmuon_jax import transform
from htmuon_jax.methods import newton_schulz as ns_lib

__all__ = [
  "SpectralSteps",
  "frame_arguments",
  "htmuon",
  "htmuon_optimizer",
  "matrix_optimizer",
  "muon",
  "partition_matrices",
  "spectral_steps",
  "warn_ignored_options",
]

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
  `optax.contrib.muon(lr)`.

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
      `"stream"`, a registered name, or a method object (e.g.
      `htmuon_jax.streaming.Stream(rank=8)`); see `spectral_power`. A method
      object carries its own options (`ns_*`, `preconditioning`, `rank`,
      `stream_qr` then do not apply).
    spectral_eps: relative cutoff for tiny singular values: `s <= spectral_eps
      * s_max` counts as zero.
    nesterov: Nesterov momentum (both branches, as in optax, unless
      `adam_nesterov` is set).
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
      step (a `Mesh`, mesh axis name(s), or a `htmuon_jax.sharding.Distribute`):
      matrices of equal shape are spread whole over the devices, one
      all-to-all in and one out; see `htmuon_jax.sharding`.
    spectrum: `"power"` (`U diag(s**p) V^T`) or `"rank"`, the authors'
      rank-based `U diag(i**-p) V^T` (methods `"auto"`, `"svd"`, `"eigh"`,
      `"stream"`).
    rank: `method="stream"`: tracked singular directions (`None`: all).
    stream_qr: `method="stream"`: `"qr"` or `"cholesky"`.
    interval: `None`, or `k`: the HT step every `k`-th update (updates `k,
      2k, ...` as the authors' code), Muon's `U V^T` by `interval_method`
      otherwise, selected inside the jitted step (see `scale_by_htmuon`).
    interval_method: method of the non-HT steps (default Newton-Schulz).
    interval_first: `True` runs the HT steps on updates `1, k + 1, ...`
      instead (the first update included).
    stream_side: `method="stream"`: basis on the `"smaller"` side of each
      matrix (default, cheapest) or the `"fan_in"` side (the authors').
    adam_nesterov: Nesterov flag of the AdamW branch; `None` (default) uses
      `nesterov`, as `optax.contrib.muon` does. The authors' optimizer is
      Nesterov matrices with plain AdamW for the rest: `nesterov=True,
      adam_nesterov=False`.
    precision: `"auto"` (default: `"accurate"` on CPU, `"fast"` on GPU/TPU
      for `"polynomial"`; optax's numbers for `"newton_schulz"`),
      `"accurate"` or `"fast"`: bfloat16-operand, float32-accumulated
      products for `method="polynomial"` and `"newton_schulz"` (see
      `spectral_power`; costs in BENCHMARKS.md, "Accelerator cost").

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: at construction, naming the argument, for values that would
      silently harm a run: `learning_rate=None`, a negative or non-finite
      `learning_rate` or `adam_learning_rate` (a schedule at step 0), a negative
      `consistent_rms`, an integer `mu_dtype`, an `ns_steps` that is not a
      positive int (a traced, injected one is not checked), a non-bool
      `adaptive`, an invalid `rank`, `stream_qr` or `interval_method` (also
      when the chosen method does not use it), and out-of-range `power`,
      `beta`, `spectral_eps`.

  Warns:
    UserWarning: for options that the chosen method ignores (`rank` or
      `stream_qr` without `method="stream"`; `preconditioning`, `ns_steps`
      or `ns_coeffs` where no Newton-Schulz step runs); see
      `warn_ignored_options`.

  References:
    Pang et al., `HTMuon: Improving Muon via Heavy-Tailed Spectral
    Correction <https://arxiv.org/abs/2603.10067>`_, 2026.

    Jordan, `Muon <https://github.com/KellerJordan/Muon>`_, 2024.
  """
  return htmuon_optimizer(dict(locals()))


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
    return shape_groups.group_leaves(matrix_chain, dim_nums, weight_decay_mask)

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
    shape_groups.group_leaves(lambda dims, mask: adamw),
    muon_weight_dimension_numbers,
  )


class SpectralSteps(NamedTuple):
  """The spectral methods of an alias, built from its flat keywords."""

  method: methods.SpectralMethod  # the HT step's
  interval_method: methods.SpectralMethod  # the other steps' (interval=k)
  # The flat keywords given that none of the methods that run takes.
  ignored: tuple[str, ...]


def spectral_steps(arguments: Mapping[str, Any]) -> SpectralSteps:
  """The methods of an alias's spectral steps, from its arguments.

  The one place where an alias's flat optax-style keywords become method
  objects (`methods.from_keywords`; invalid values raise here, also for
  options the chosen method does not use), and where the keywords that no
  running method takes are found (`methods.ignored_keywords`: from the
  methods' declared options, with the interval step's method counted where
  `interval` is set).

  Args:
    arguments: the alias's arguments by name (its `locals()` on entry):
      `method`, `eps`, `interval`, `interval_method`, and the flat keywords
      (those the registered methods declare: `ns_coeffs`, `ns_steps`,
      `preconditioning`, `rank`, `stream_qr`, `stream_side`, `precision`).
      `eps`, also AdamW's, sets the Newton-Schulz guard as in optax and is
      never reported as ignored.

  Returns:
    A `SpectralSteps`.
  """
  transform.check_interval_method(arguments["interval_method"])
  declared = methods.keyword_defaults()
  keywords = {k: v for k, v in arguments.items() if k in declared}
  built = [
    methods.from_keywords(arguments[k], ns_eps=arguments["eps"], **keywords)
    for k in ("method", "interval_method")
  ]
  used = built if arguments["interval"] is not None else built[:1]
  ignored = methods.ignored_keywords(used, keywords)
  return SpectralSteps(built[0], built[1], tuple(ignored))


def warn_ignored_options(steps: SpectralSteps, stacklevel: int = 3) -> None:
  """Warns (`UserWarning`) for each keyword given that no method running takes.

  An option counts as given when it differs from its default; which
  methods take it is what their classes declare
  (`SpectralMethod.keyword_options`). Call it after construction (invalid
  values have raised).
  """
  for name in steps.ignored:
    warnings.warn(
      f"{name} is ignored with method={steps.method.name!r}: it acts only "
      f"with {methods.where_used(name)}.",
      UserWarning,
      stacklevel=stacklevel,
    )


def frame_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
  """The arguments of `matrix_optimizer` found among an alias's arguments."""
  return {k: arguments[k] for k in _FRAME_KEYWORDS if k in arguments}


_FRAME_KEYWORDS = tuple(inspect.signature(matrix_optimizer).parameters)[1:]


def htmuon_optimizer(
  arguments: Mapping[str, Any],
  between: Callable[
    [dn.WeightDimNumOrFn], Sequence[optax.GradientTransformation]
  ] = lambda dims: (),
) -> optax.GradientTransformationExtraArgs:
  """`htmuon` from its arguments, with `between(dims)` after the HT step.

  The frame of the aliases built on HTMuon's direction: `scale_by_htmuon`,
  then `between` (e.g. NorMuon's normalization), then `scale_by_shape`, in
  `matrix_optimizer`.

  Args:
    arguments: `htmuon`'s arguments by name (an alias's `locals()`).
    between: the transformations after the spectral step, given the
      dimension numbers.

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  a = arguments
  checks.check_learning_rates(a["learning_rate"], a["adam_learning_rate"])
  checks.check_range(a["beta"], "beta", 0.0, 1.0, high_open=True)
  steps = spectral_steps(a)

  def direction(
    dims: dn.WeightDimNumOrFn,
  ) -> tuple[optax.GradientTransformation, ...]:
    return (
      transform.scale_by_htmuon(
        a["power"],
        a["beta"],
        nesterov=a["nesterov"],
        bias_correction=a["bias_correction"],
        mu_dtype=a["mu_dtype"],
        method=steps.method,
        eps=a["spectral_eps"],
        weight_dimension_numbers=dims,
        adaptive=a["adaptive"],
        spectrum=a["spectrum"],
        interval=a["interval"],
        interval_method=steps.interval_method,
        interval_first=a["interval_first"],
        distribute=a["distribute"],
      ),
      *between(dims),
      transform.scale_by_shape(
        weight_dimension_numbers=dims, consistent_rms=a["consistent_rms"]
      ),
    )

  optimizer = matrix_optimizer(direction, **frame_arguments(a))
  warn_ignored_options(steps, stacklevel=4)
  return optimizer


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
  method: methods.MethodLike = "newton_schulz",
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
  rank: Optional[int] = None,
  stream_qr: str = "qr",
  interval: Optional[int] = None,
  interval_method: methods.MethodLike = "newton_schulz",
  interval_first: bool = False,
  stream_side: str = "smaller",
  adam_nesterov: Optional[bool] = None,
  precision: str = "auto",
) -> optax.GradientTransformationExtraArgs:
  """Muon: `htmuon` with `power=0`, i.e. `U V^T` of the momentum per matrix.

  Takes every argument of `htmuon` (same order, same meaning) except those
  that only matter for `power != 0` (`power`, `spectrum`). By default it
  runs Muon's Newton-Schulz iteration and reproduces `optax.contrib.muon`;
  `method="svd"` or `"polynomial"` gives the exact polar factor,
  `method="stream"` its streaming estimate.

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
    ns_coeffs: Newton-Schulz coefficients or preset (`method="newton_schulz"`).
    ns_steps: Newton-Schulz iterations (`method="newton_schulz"`).
    beta: momentum EMA decay, in [0, 1).
    eps: AdamW's epsilon and the Newton-Schulz normalization guard.
    weight_decay: decoupled weight decay of the matrix leaves.
    weight_decay_mask: tree or callable of booleans selecting the leaves that
      decay.
    mu_dtype: dtype of the momentum accumulators.
    method: `"newton_schulz"` (default) or any method (see `htmuon`).
    spectral_eps: relative cutoff for tiny singular values (exact methods).
    nesterov: Nesterov momentum (both branches, as in optax).
    bias_correction: optax's bias-corrected momentum (default); `False` is the
      authors' rule (see `scale_by_htmuon`).
    adaptive: scale matrix updates by `<N, update>` (optax's flag).
    preconditioning: Newton-Schulz input scaling (`method="newton_schulz"`).
    adam_b1: AdamW's first-moment decay.
    adam_b2: AdamW's second-moment decay.
    adam_eps_root: AdamW's epsilon inside the square root.
    adam_weight_decay: AdamW's weight decay.
    adam_learning_rate: AdamW's learning rate; defaults to `learning_rate`.
    muon_weight_dimension_numbers: which leaves are matrices (see `htmuon`).
    consistent_rms: `None` for `sqrt(max(1, fan_out/fan_in))` scaling, or a
      float `c` for `c * sqrt(max(fan_in, fan_out))`.
    distribute: where to run the distributed spectral step (see `htmuon`).
    rank: `method="stream"`: tracked singular directions (`None`: all).
    stream_qr: `method="stream"`: `"qr"` or `"cholesky"`.
    interval: `None`, or `k`: `method` on every `k`-th update (the first
      included) and `interval_method` on the others (e.g. an exact polar
      factor every `k` steps, Newton-Schulz in between).
    interval_method: method of the other updates (default Newton-Schulz).
    interval_first: with `interval=k`: `method` on updates `1, k + 1, ...`
      rather than `k, 2k, ...` (see `htmuon`).
    stream_side: `method="stream"`: where the basis lives (see `htmuon`).
    adam_nesterov: Nesterov flag of the AdamW branch (`None`: `nesterov`).
    precision: `"auto"` (default; optax's numbers), `"accurate"` (the
      same) or `"fast"` Newton-Schulz products (see `htmuon`).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Jordan, `Muon <https://github.com/KellerJordan/Muon>`_, 2024.
  """
  arguments = dict(locals())
  checks.check_learning_rates(learning_rate, adam_learning_rate)
  return htmuon(power=0.0, **arguments)
