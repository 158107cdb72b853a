"""Sharding support: optimizer-state shardings and a distributed spectral step.

Every transformation of the package runs under `jax.jit` with sharded
params, gradients and state (GSPMD partitions it like any other program).
Two things need help beyond that:

* **State shardings.** `state_shardings(opt, params)` gives the sharding of
  every leaf of `opt.init(params)`, so that optimizer state takes `1/N` of
  its size per device where its parameter is split `N` ways: leaves that
  mirror a parameter (momenta, AdamW and AdaMuon moments) take the
  parameter's sharding, per-matrix state of its own shape (streaming bases,
  NorMuon's moments) is split over the same mesh axes (along the matrix axis
  of a stack, else along its rows; `spread_spec`), and leaves of no
  parameter (counters, injected hyperparameters) are replicated. Pass it as
  `out_shardings` of a jitted `opt.init` and as the state's
  `in_shardings`/`out_shardings` of the training step.

* **The distributed spectral step.** Under plain GSPMD a spectral step on a
  sharded matrix either all-gathers the matrix to every device (SVD/eigh:
  every device then computes every decomposition) or all-reduces a Gram
  matrix in every Newton-Schulz iteration. `grouped_map` instead groups the
  matrices of equal shape (the stacked layer axis of scanned models is part
  of the group), spreads whole matrices over the devices of a mesh (the group
  is padded with zero matrices to a multiple of the device count), runs the
  per-matrix step locally in a `jax.shard_map` (no collective inside), and
  brings the results back: one all-to-all in and one out per group. Enable it
  with `distribute=` on `scale_by_spectral_power`, `scale_by_htmuon`,
  `htmuon`, `muon`, `htnormuon` and `htadamuon`, for every method including
  `method="stream"`, whose per-matrix basis travels with its matrix
  (`_grouping.update_per_matrix`); `htnormuon` (`scale_by_normuon`) runs
  NorMuon's normalization the same way, each matrix next to its moments. A
  stack of matrices whose count is a multiple of the device count is split
  along the stack in place, so per-matrix state stored that way
  (`state_shardings` of a stacked parameter) does not move at all; the
  state of other matrices moves with them by the same all-to-alls. Nothing
  of the state is gathered.

The package, by job: `distribute` (what `distribute=` accepts, validated by
`as_distribute`), `grouped_map` (the distributed step, part of the
package's one grouping plan, `htmuon_jax._grouping`),
`state` (`state_shardings`, `spread_spec`, and `per_matrix_state`, which
declares a state type's per-matrix fields on the type), and `auto_axes`
(`with_auto_axes`). The HLO collective counter of the tests and benchmarks
is `htmuon_jax.testing.count_collectives`.
"""

from htmuon_jax.sharding._auto_axes import with_auto_axes
from htmuon_jax.sharding._distribute import DEFAULT_EXECUTION
from htmuon_jax.sharding._distribute import Distribute
from htmuon_jax.sharding._distribute import DistributeLike
from htmuon_jax.sharding._distribute import Execution
from htmuon_jax.sharding._distribute import ExecutionLike
from htmuon_jax.sharding._distribute import as_distribute
from htmuon_jax.sharding._distribute import as_execution
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
