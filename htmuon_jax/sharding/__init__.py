"""Sharding: the `Execution` value, optimizer-state shardings, the distributed step.

Every transformation of the package runs under `jax.jit` with sharded
params, gradients and state. `state_shardings(opt, params)` places the
optimizer state like its parameters (per-matrix state of its own shape is
split over the same mesh axes, `spread_spec`). `distribute=` (an
`Execution`, a `Mesh` or mesh axis names) spreads whole matrices of equal
shape over the devices and runs the spectral step locally in a `shard_map`:
one all-to-all in and one out per group (`grouped_map`), per-matrix state
travelling with its matrix. See docs/sharding.md.
"""

from htmuon_jax.sharding._distribute import DEFAULT_EXECUTION
from htmuon_jax.sharding._distribute import Distribute
from htmuon_jax.sharding._distribute import DistributeLike
from htmuon_jax.sharding._distribute import Execution
from htmuon_jax.sharding._distribute import ExecutionLike
from htmuon_jax.sharding._distribute import as_distribute
from htmuon_jax.sharding._distribute import as_execution
from htmuon_jax.sharding._distribute import with_auto_axes
from htmuon_jax.sharding._state import per_matrix_fields
from htmuon_jax.sharding._state import per_matrix_state
from htmuon_jax.sharding._state import spread_spec
from htmuon_jax.sharding._state import state_shardings

# The distributed step is part of the package's one grouping plan; imported
# last, as it builds on the modules above.
from htmuon_jax._grouping import bind_static_args  # noqa: E402
from htmuon_jax._grouping import grouped_map  # noqa: E402

__all__ = [
  "DEFAULT_EXECUTION",
  "Distribute",
  "DistributeLike",
  "Execution",
  "ExecutionLike",
  "as_distribute",
  "as_execution",
  "bind_static_args",
  "grouped_map",
  "per_matrix_fields",
  "per_matrix_state",
  "spread_spec",
  "state_shardings",
  "with_auto_axes",
]
