"""`method="polynomial"`: `U diag(s**p) V^T` with matrix products only.

The public home of `spectral_power_polynomial`, its construction-time
`prepare` and the `Polynomial` method object; the code, and the account of
the algorithm, its accuracy and its precisions, live in
`htmuon_jax.methods.polynomial`, next to the other methods.
"""

from htmuon_jax.methods.polynomial import MIN_LOWER as MIN_LOWER
from htmuon_jax.methods.polynomial import PRECISIONS as PRECISIONS
from htmuon_jax.methods.polynomial import Polynomial as Polynomial
from htmuon_jax.methods.polynomial import design_interval as design_interval
from htmuon_jax.methods.polynomial import prepare as prepare
from htmuon_jax.methods.polynomial import (
  spectral_power_polynomial as spectral_power_polynomial,
)
