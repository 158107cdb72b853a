"""htmuon_jax: HTMuon and the Muon family of spectral optimizers for JAX/Optax."""

from optax.contrib import MuonDimensionNumbers

from htmuon_jax import diagnostics
from htmuon_jax import methods
from htmuon_jax import sharding

from htmuon_jax._adamuon import htadamuon
from htmuon_jax._adamuon import scale_by_adamuon
from htmuon_jax._alias import htmuon
from htmuon_jax._alias import muon
from htmuon_jax._alias import partition_matrices
from htmuon_jax._layouts import describe_routing
from htmuon_jax._layouts import dimension_rules
from htmuon_jax._layouts import flax_dimension_numbers
from htmuon_jax._layouts import infer_stacked_axes
from htmuon_jax._layouts import leaf_routes
from htmuon_jax._layouts import resolve_dimension_numbers
from htmuon_jax._normuon import htnormuon
from htmuon_jax._normuon import scale_by_normuon
from htmuon_jax._row_norm import rmnp
from htmuon_jax._row_norm import scale_by_row_norm
from htmuon_jax.sharding import Execution
from htmuon_jax.sharding import state_shardings
from htmuon_jax._transform import ScaleByHTMuonState
from htmuon_jax._transform import scale_by_htmuon
from htmuon_jax._transform import scale_by_momentum
from htmuon_jax._transform import scale_by_shape
from htmuon_jax._transform import scale_by_spectral_power
from htmuon_jax._transform import spectral_power

__version__ = "0.1.0"

# Every optimizer alias, by name: the one list that the contract tests, the
# benchmarks and the examples iterate, so a new alias is covered by adding
# it here.
ALIASES = {
  "htmuon": htmuon,
  "muon": muon,
  "htnormuon": htnormuon,
  "htadamuon": htadamuon,
  "rmnp": rmnp,
}

# The public surface: the aliases and their pieces; everything else lives
# in its module (`methods`, `sharding`, `diagnostics`, ...).
__all__ = [
  "ALIASES",
  "Execution",
  "MuonDimensionNumbers",
  "ScaleByHTMuonState",
  "describe_routing",
  "diagnostics",
  "dimension_rules",
  "flax_dimension_numbers",
  "htadamuon",
  "htmuon",
  "htnormuon",
  "infer_stacked_axes",
  "leaf_routes",
  "methods",
  "muon",
  "partition_matrices",
  "resolve_dimension_numbers",
  "rmnp",
  "scale_by_adamuon",
  "scale_by_htmuon",
  "scale_by_momentum",
  "scale_by_normuon",
  "scale_by_row_norm",
  "scale_by_shape",
  "scale_by_spectral_power",
  "sharding",
  "spectral_power",
  "state_shardings",
]
