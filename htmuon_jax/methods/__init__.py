"""Spectral methods as objects: what a method is, how one runs, their names.

A method is a frozen dataclass subclassing `SpectralMethod` (`base`) that
holds its own options; `run_method` (`base`) applies the steps every method
shares and calls its `apply`; `htmuon_jax.scale_by_spectral_power` makes it
an `optax.GradientTransformation`. The registry (`registry`) maps names to
objects (`method="svd"`), with `register_method` / `unregister_method`,
`get_method`, `Auto` (the per-backend choice) and `from_keywords`, the one
adapter from the aliases' flat keywords (`ns_steps`, `rank`, ...) to a
method object. The built-ins, one module each: `svd.SVD`, `eigh.Eigh`,
`newton_schulz.NewtonSchulz`, `polynomial.Polynomial`, `express.Express`,
`stream.Stream`
(stateful). See docs/architecture.md for adding one.
"""

from htmuon_jax.methods._base import DEFAULT_EPS
from htmuon_jax.methods._base import SPECTRA
from htmuon_jax.methods._base import MethodState
from htmuon_jax.methods._base import SpectralMethod
from htmuon_jax.methods._base import ValuesFn
from htmuon_jax.methods._base import check_state
from htmuon_jax.methods._base import keep_mask
from htmuon_jax.methods._base import powered_singular_values
from htmuon_jax.methods._base import rank_singular_values
from htmuon_jax.methods._base import run_method
from htmuon_jax.methods._eigh import Eigh
from htmuon_jax.methods._express import Express
from htmuon_jax.methods._newton_schulz import NewtonSchulz
from htmuon_jax.methods._polynomial import Polynomial
from htmuon_jax.methods._registry import Auto
from htmuon_jax.methods._registry import MethodLike
from htmuon_jax.methods._registry import check_method
from htmuon_jax.methods._registry import from_keywords
from htmuon_jax.methods._registry import get_method
from htmuon_jax.methods._registry import ignored_keywords
from htmuon_jax.methods._registry import keyword_defaults
from htmuon_jax.methods._registry import method_names
from htmuon_jax.methods._registry import register_method
from htmuon_jax.methods._registry import resolve_method
from htmuon_jax.methods._registry import unregister_method
from htmuon_jax.methods._registry import where_used
from htmuon_jax.methods._stream import Stream
from htmuon_jax.methods._svd import SVD

__all__ = [
  "DEFAULT_EPS",
  "SPECTRA",
  "SVD",
  "Auto",
  "Eigh",
  "Express",
  "MethodLike",
  "MethodState",
  "NewtonSchulz",
  "Polynomial",
  "SpectralMethod",
  "Stream",
  "ValuesFn",
  "check_method",
  "check_state",
  "from_keywords",
  "get_method",
  "ignored_keywords",
  "keep_mask",
  "keyword_defaults",
  "method_names",
  "powered_singular_values",
  "rank_singular_values",
  "register_method",
  "resolve_method",
  "run_method",
  "unregister_method",
  "where_used",
]
