"""Spectral methods as objects: how `U f(S) V^T` is computed.

A method is a frozen dataclass subclassing `SpectralMethod` that holds its
own options; `run_method` applies the steps every method shares and calls
its `apply`. `method="name"` selects a registered object
(`register_method`, `get_method`, `method_names`); `Auto` picks one per
backend. The built-ins: `SVD`, `Eigh`, `NewtonSchulz`, `Polynomial`,
`Express` and the stateful `Stream`. See docs/architecture.md for adding
one.
"""

from htmuon_jax.methods._base import DEFAULT_EPS
from htmuon_jax.methods._base import SPECTRA
from htmuon_jax.methods._base import MethodState
from htmuon_jax.methods._base import SpectralMethod
from htmuon_jax.methods._base import run_method
from htmuon_jax.methods._exact import SVD
from htmuon_jax.methods._exact import Eigh
from htmuon_jax.methods._express import Express
from htmuon_jax.methods._newton_schulz import NewtonSchulz
from htmuon_jax.methods._polynomial import Polynomial
from htmuon_jax.methods._registry import Auto
from htmuon_jax.methods._registry import MethodLike
from htmuon_jax.methods._registry import from_keywords
from htmuon_jax.methods._registry import get_method
from htmuon_jax.methods._registry import method_names
from htmuon_jax.methods._registry import register_method
from htmuon_jax.methods._registry import unregister_method
from htmuon_jax.methods._stream import Stream

# Used by the package's transformations and aliases (not public).
from htmuon_jax.methods._base import check_state
from htmuon_jax.methods._registry import check_method
from htmuon_jax.methods._registry import ignored_keywords
from htmuon_jax.methods._registry import resolve_method
from htmuon_jax.methods._registry import where_used

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
  "from_keywords",
  "get_method",
  "method_names",
  "register_method",
  "run_method",
  "unregister_method",
]
