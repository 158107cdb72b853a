"""`scale_by_method`: a spectral method as an `optax.GradientTransformation`.

Stateless methods give a stateless transformation, stateful ones keep their
per-matrix state in their `state_type`; both run through the package's
per-matrix executor (`matrix_state.update_per_matrix`), with `distribute=`.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from htmuon_jax import dimension_numbers as dn
from htmuon_jax import matrix_state
from htmuon_jax import sharding as sharding_lib
from htmuon_jax.methods.base import DEFAULT_EPS
from htmuon_jax.methods.base import SpectralMethod
from htmuon_jax.methods.base import check_state
from htmuon_jax.methods.base import run_method

__all__ = ["scale_by_method"]


def scale_by_method(
  method: SpectralMethod,
  power: Any,
  *,
  eps: Any = DEFAULT_EPS,
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
      return run_method(method, m, None, power, eps, spectrum)[0]

    def stateless_update(updates, state, params=None):
      del params
      check_state(method, state, updates, None)
      # U f(S) V^T commutes with transposition, so tall and wide matrices of
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

  def step(m: jax.Array, s: Any, power: Any, eps: Any) -> tuple[Any, Any]:
    return run_method(method, m, s, power, eps, spectrum)

  def init_fn(params):
    return method.state_type(
      matrix_state.init_per_matrix(
        method.init, params, weight_dimension_numbers
      )
    )

  def update_fn(updates, state, params=None):
    del params
    check_state(method, state, updates, init_fn)  # trace time only
    # `power` and `eps` may be traced (injected): passed as arguments.
    new_updates, new_state = matrix_state.update_per_matrix(
      step,
      updates,
      state[0],
      weight_dimension_numbers,
      execution,
      args=(power, eps),
    )
    return new_updates, method.state_type(new_state)

  return optax.GradientTransformation(init_fn, update_fn)
