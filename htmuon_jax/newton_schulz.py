"""Muon's quintic Newton-Schulz iteration, as `optax.contrib.muon` runs it.

The public home of `newton_schulz` (the function), `NewtonSchulz` (the
method object, `method="newton_schulz"`) and the coefficient presets; the
code lives in `htmuon_jax.methods.newton_schulz`, next to the other
methods.
"""

from htmuon_jax.methods.newton_schulz import (
  DEFAULT_NS_COEFFS as DEFAULT_NS_COEFFS,
)
from htmuon_jax.methods.newton_schulz import DION_NS_COEFFS as DION_NS_COEFFS
from htmuon_jax.methods.newton_schulz import (
  NS_COEFFS_PRESETS as NS_COEFFS_PRESETS,
)
from htmuon_jax.methods.newton_schulz import (
  PRECONDITIONINGS as PRECONDITIONINGS,
)
from htmuon_jax.methods.newton_schulz import NewtonSchulz as NewtonSchulz
from htmuon_jax.methods.newton_schulz import NSCoeffs as NSCoeffs
from htmuon_jax.methods.newton_schulz import Preconditioning as Preconditioning
from htmuon_jax.methods.newton_schulz import check_ns_steps as check_ns_steps
from htmuon_jax.methods.newton_schulz import (
  check_preconditioning as check_preconditioning,
)
from htmuon_jax.methods.newton_schulz import newton_schulz as newton_schulz
from htmuon_jax.methods.newton_schulz import (
  ns_coefficient_table as ns_coefficient_table,
)
