"""method="express": accuracy against a float64 SVD, and its FLOPs vs NS5.

The issue's contract (#31): relative Frobenius error against the float64
`U S^p V^T` of <= 3% with float32 products and <= 5% with bfloat16 ones,
for p in [1/16, 1/4], on gradient-like spectra; at p = 0 at least as close
to `U V^T` as optax's NS5; dot FLOPs of the traced program <= NS5's.
"""

import functools
import inspect
import math

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import htmuon_jax
from htmuon_jax import _minimax as minimax
from htmuon_jax import testing as optax_compat
from tests.reference import matrix_with_spectrum, rel_err, spectral_power_ref

POWERS = (1 / 16, 1 / 8, 1 / 4)


def _cases():
  rng = np.random.default_rng(1)
  i = np.arange(1, 257, dtype=np.float64)
  return {
    "power_law_0.8": matrix_with_spectrum(rng, 256, 256, i**-0.8),
    "power_law_1.1_wide": matrix_with_spectrum(rng, 192, 384, i[:192] ** -1.1),
    "geometric_1e2": matrix_with_spectrum(
      rng, 160, 160, np.logspace(0, -2, 160)
    ),
    "geometric_1e3": matrix_with_spectrum(
      rng, 160, 160, np.logspace(0, -3, 160)
    ),
    "gaussian_square": rng.standard_normal((256, 256)),
    "gaussian_tall": rng.standard_normal((384, 128)),
  }


CASES = _cases()


def _express(x, power, precision, steps=4):
  method = htmuon_jax.methods.Express(precision=precision, steps=steps)
  x = jnp.asarray(x, jnp.float32)
  return htmuon_jax.spectral_power(x, power, method=method)


@pytest.mark.parametrize(
  "precision, bound", [("accurate", 0.03), ("fast", 0.05)]
)
@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_five_steps_meet_the_issue_bounds(case, power, precision, bound):
  x = CASES[case]
  out = _express(x, power, precision, steps=5)
  chex.assert_shape(out, x.shape)
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)
  # The issue's bounds: 3% with float32 products (HIGHEST), 5% with
  # bfloat16 operands (unit roundoff 2^-8; one rounding of the input alone
  # moves the exact answer 0.2-3%, benchmarks/fast_precision.py). Measured
  # here: <= 1.2% in both (docs/muon_cost_design.md).
  assert rel_err(out, spectral_power_ref(x, power)) <= bound


def _design_error(x: np.ndarray, power: float, steps: int) -> float:
  """The error the scalar design predicts for `x`, from its float64 SVD."""
  s = np.linalg.svd(x, compute_uv=False)
  d = minimax.express_design(power, minimax.EXPRESS_TABLES[steps])
  # The method divides by ||A_0^2||_F^(1/4) = (sum s^8)^(1/8).
  c = np.sum(s**8) ** 0.125
  f = minimax.express_map(d, s / c) * c**power
  return float(np.linalg.norm(f - s**power) / np.linalg.norm(s**power))


@pytest.mark.parametrize(
  "precision, slack", [("accurate", 1e-3), ("fast", 1e-2)]
)
@pytest.mark.parametrize("power", [1 / 16, 1 / 4])
@pytest.mark.parametrize("case", sorted(CASES))
def test_default_steps_are_their_design(case, power, precision, slack):
  # The default (4 steps, NS5's FLOPs) lands a few percent from the exact
  # answer by design (2.5-8% on these spectra, above the issue's 3%: see
  # docs/muon_cost_design.md). Here: the matrix computation is that design,
  # i.e. its error is what the float64 scalar map predicts on the matrix's
  # own singular values, up to float32 rounding (15 products, weights
  # < 2: ~1e-5, slack 1e-3) or bfloat16 operands (2^-8 per rounding, 15
  # roundings: slack 1e-2, one percentage point; at p = 0, where the
  # weights are larger, bf16 adds up to ~2 points, see the design note).
  x = CASES[case]
  err = rel_err(_express(x, power, precision), spectral_power_ref(x, power))
  predicted = _design_error(x, power, 4)
  assert abs(err - predicted) <= slack, (err, predicted)
  assert predicted < 0.1


# optax muon's defaults: its quintic coefficients, 5 steps.
NS_COEFFS = (
  inspect.signature(optax.contrib.muon).parameters["ns_coeffs"].default
)


def _ns5(x):
  """optax's own Newton-Schulz (5 steps), as `optax.contrib.muon` runs it."""
  return optax_compat.orthogonalize_via_newton_schulz(
    x, ns_coeffs=jnp.asarray(NS_COEFFS), ns_steps=5
  )


@pytest.mark.parametrize("steps", [4, 5])
@pytest.mark.parametrize("precision", ["accurate", "fast"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_power_zero_at_least_as_close_as_ns5(case, precision, steps):
  x = CASES[case]
  ref = spectral_power_ref(x, 0.0)
  ours = rel_err(_express(x, 0.0, precision, steps), ref)
  # optax's NS5 in float32 (its own precision on CPU: plain fp32 products).
  ns5 = rel_err(_ns5(jnp.asarray(x, jnp.float32)), ref)
  assert ours <= ns5, (ours, ns5)


# --- FLOPs of the traced program --------------------------------------------


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for j in v if isinstance(v, (tuple, list)) else [v]:
      if isinstance(j, jax.extend.core.ClosedJaxpr):
        yield j.jaxpr
      elif isinstance(j, jax.extend.core.Jaxpr):
        yield j


def dot_flops(jaxpr) -> int:
  """Dot FLOPs of a jaxpr: 2 x output size x contracted size per
  `dot_general`, loop bodies (`scan`, as `fori_loop` with static bounds
  lowers) times their trip counts, the costlier branch of a `cond`."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(lhs[d] for d in contract)
    elif name == "scan":
      total += eqn.params["length"] * dot_flops(eqn.params["jaxpr"].jaxpr)
    elif name == "while":
      raise AssertionError("a while loop: its trip count is not static")
    elif name == "cond":
      total += max(dot_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      total += sum(dot_flops(j) for j in _sub_jaxprs(eqn))
  return total


def _flops(fn, shape) -> int:
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return dot_flops(jax.make_jaxpr(fn)(x).jaxpr)


def test_dot_flops_counts_a_known_program():
  def fn(x):
    y = x @ x.T  # 2 * 8 * 8 * 16
    return jax.lax.fori_loop(0, 3, lambda i, y: y @ y, y)  # 3 * 2 * 8^3

  assert _flops(fn, (8, 16)) == 2 * 8 * 8 * 16 + 3 * 2 * 8**3


# The issue's shapes: square 1024^2 and 4096^2, 768 x 3072, and the
# LLaMA-60M and LLaMA-1B matrix sets (every attention and MLP matrix, the
# embedding and the head: the HTMuon authors' split; a batch per shape).
LLAMA_60M = {(512, 512): 32, (1376, 512): 24, (32000, 512): 2}
LLAMA_1B = {(2048, 2048): 96, (5461, 2048): 72, (32000, 2048): 2}
SHAPES = {
  "1024^2": {(1024, 1024): 1},
  "4096^2": {(4096, 4096): 1},
  "768x3072": {(768, 3072): 1},
  "3072x768": {(3072, 768): 1},
  "LLaMA-60M": LLAMA_60M,
  "LLaMA-1B": LLAMA_1B,
}


def _set_flops(method, shapes: dict) -> tuple[int, int]:
  """(the method's, optax NS5's) dot FLOPs on a set of batched shapes."""
  ours = base = 0
  for (m, n), count in shapes.items():
    shape = (count, m, n) if count > 1 else (m, n)
    ours += _flops(
      functools.partial(htmuon_jax.spectral_power, power=0.125, method=method),
      shape,
    )
    base += _flops(jax.vmap(_ns5) if count > 1 else _ns5, shape)
  return ours, base


@pytest.mark.parametrize("precision", ["accurate", "fast"])
@pytest.mark.parametrize("name", sorted(SHAPES))
def test_dot_flops_at_most_ns5(name, precision):
  method = htmuon_jax.methods.Express(precision=precision)
  ours, base = _set_flops(method, SHAPES[name])
  assert 0 < ours <= base, ours / base


def test_five_steps_cost_six_fifths_of_ns5():
  # 18 products of NS5's sizes in place of its 15.
  method = htmuon_jax.methods.Express(steps=5)
  ours, base = _set_flops(method, SHAPES["1024^2"])
  assert ours * 5 == base * 6


# --- registration and options -------------------------------------------------


def test_selected_by_name_and_as_an_object():
  assert "express" in htmuon_jax.methods.method_names()
  x = jnp.asarray(CASES["gaussian_tall"][:48, :32], jnp.float32)
  by_name = htmuon_jax.spectral_power(x, 0.125, method="express")
  by_object = htmuon_jax.spectral_power(
    x, 0.125, method=htmuon_jax.methods.Express()
  )
  chex.assert_trees_all_close(by_name, by_object)
  params = {"w": x}
  opt = htmuon_jax.htmuon(0.01, method="express")
  updates, _ = jax.jit(opt.update)(params, opt.init(params), params)
  chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize("bad", [3, 6, True, "4"])
def test_unknown_steps_raise(bad):
  with pytest.raises(ValueError, match="steps"):
    htmuon_jax.htmuon(0.01, method=htmuon_jax.methods.Express(steps=bad))


def test_traced_power_raises():
  x = jnp.ones((4, 6), jnp.float32)
  with pytest.raises(ValueError, match="concrete power"):
    jax.jit(lambda p: htmuon_jax.spectral_power(x, p, method="express"))(0.125)
