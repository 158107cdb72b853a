"""method="polynomial" against an independent float64 SVD reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import htmuon_jax
from htmuon_jax.methods import _polynomial as polynomial
from tests.reference import matrix_with_spectrum, rel_err, spectral_power_ref

POWERS = (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 0.3)


def _cases():
  rng = np.random.default_rng(0)
  return {
    # Gaussian: square ones span ~1e2..1e3, rectangular ones ~10.
    "square": rng.standard_normal((48, 48)),
    "tall": rng.standard_normal((96, 32)),
    "wide": rng.standard_normal((32, 96)),
    "batched": rng.standard_normal((3, 24, 40)),
    # Power-law spectra s_i ~ i^-a, spanning 64^1.5 = 512 and 1e3.
    "power_law": matrix_with_spectrum(rng, 64, 80, np.arange(1, 65) ** -1.5),
    "power_law_tall": matrix_with_spectrum(
      rng, 120, 100, np.arange(1, 101) ** -1.5
    ),
    "span_1e3": matrix_with_spectrum(rng, 64, 64, np.logspace(0, -3, 64)),
  }


CASES = _cases()


def _spectral_power(x, power, eps=htmuon_jax.methods.DEFAULT_EPS, **options):
  method = htmuon_jax.methods.Polynomial(**options)
  return htmuon_jax.spectral_power(x, power, method=method, eps=eps)


@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_svd(case, power):
  x = CASES[case]
  out = _spectral_power(jnp.asarray(x, jnp.float32), power)
  chex.assert_shape(out, x.shape)
  chex.assert_type(out, jnp.float32)
  chex.assert_tree_all_finite(out)
  # The method's contract for spectra spanning <= 1e3: the scalar design is
  # within 4e-5 (minimax.DEFAULT_TOL) of s^p; 28 fp32 products round to
  # ~6e-8 each and the weights are < 10, so ~1e-5 (measured <= 1.2e-5).
  assert rel_err(out, spectral_power_ref(x, power)) < 1e-4


def _bf16_floor(x: np.ndarray, power: float) -> float:
  """What rounding the input to bfloat16 alone does to the exact answer."""
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
  return rel_err(spectral_power_ref(xb, power), spectral_power_ref(x, power))


@pytest.mark.parametrize("power", [0.0, 0.125, 0.5])
@pytest.mark.parametrize("case", ["square", "tall", "batched", "span_1e3"])
def test_fast_precision_vs_float64_svd(case, power):
  x = CASES[case]
  out = _spectral_power(jnp.asarray(x, jnp.float32), power, precision="fast")
  chex.assert_type(out, jnp.float32)
  err = rel_err(out, spectral_power_ref(x, power))
  floor = _bf16_floor(x, power)
  # The target for the fast setting: at most 2x what one bf16
  # rounding of the input does to the exact answer, per matrix. The
  # correction form of the steps (`X + D X`, D vanishing on converged
  # directions) keeps the later roundings below that floor (measured
  # 0.4-1.4x over these cases and 128-512 sized ones; the plain form was
  # 1.6-7x).
  assert err < 2 * floor, (err, floor)
  # And it is not accurate-mode accuracy: bf16 rounding is really there.
  assert err > 1e-4


def test_fast_precision_flops_are_bf16():
  # Every matrix-matrix dot of the lowered program (each loop body counted
  # once; the body's products are all bf16 in "fast", so the share at run
  # time is higher): >= 80% of the FLOPs must take bf16 operands.
  x = jnp.ones((48, 80), jnp.float32)
  for prec, share in (("fast", 0.8), ("accurate", 0.0)):
    hlo = (
      jax.jit(lambda m, prec=prec: _spectral_power(m, 0.125, precision=prec))
      .lower(x)
      .compiler_ir("hlo")
      .as_hlo_text()
    )
    dots = _dots(hlo)
    total = sum(f for f, _ in dots)
    bf16 = sum(f for f, dt in dots if dt == "bf16")
    # The steps are one loop body: a handful of dots (not 28 unrolled
    # products), whatever the number of steps.
    assert 6 <= len(dots) <= 12, len(dots)
    if prec == "fast":
      assert bf16 / total >= share
    else:
      assert bf16 == 0


def _dots(hlo: str) -> list[tuple[float, str]]:
  """(FLOPs, operand dtype) of each dot in an HLO module's text."""
  import re

  types = {}
  out = []
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?([\w.-]+) = (\w+)\[([\d,]*)\]", line)
    if not m:
      continue
    name, dtype, dims = m.groups()
    shape = [int(d) for d in dims.split(",") if d]
    types[name] = (dtype, shape)
    d = re.search(
      r" dot\(([\w.-]+), ([\w.-]+)\).*lhs_contracting_dims="
      r"\{(\d+)\}",
      line,
    )
    if d:
      lhs_t, lhs_shape = types[d.group(1)]
      contract = lhs_shape[int(d.group(3))]
      out.append((2.0 * np.prod(shape) * contract, lhs_t))
  return out


def test_medium_square_gaussian():
  # A 256^2 Gaussian usually spans ~5e2, but its smallest singular values
  # can fall below 1e-3 s_max (this one does). Those fade instead of being
  # mapped to s^p, so the error is bounded by their share of ||S^p||_F
  # (which the method may lose entirely) plus the in-contract 1e-4.
  x = np.random.default_rng(1).standard_normal((256, 256)).astype(np.float32)
  p = 1 / 16
  out = jax.jit(_spectral_power, static_argnums=1)(jnp.asarray(x), p)
  s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
  outside = s[s < polynomial.MIN_LOWER * s[0]]
  share = np.sqrt(np.sum(outside ** (2 * p)) / np.sum(s ** (2 * p)))
  assert outside.size > 0  # The case exercises the fading.
  assert rel_err(out, spectral_power_ref(x, p)) < 1e-4 + share


def test_singular_value_above_interval_kept_below_fades():
  # A singular value at 1.2e-3 s_max (inside the accurate interval) must be
  # mapped to s^p; one far below it (1e-6) fades to ~0, as the cutoff rule
  # sends it to 0. All other singular values equal: the scale estimate sees
  # a cluster.
  rng = np.random.default_rng(2)
  for ratio, expected, tol in ((1.2e-3, 1.0, 1e-4), (1e-6, 0.0, 0.01)):
    s = np.r_[np.ones(31), ratio]
    x = matrix_with_spectrum(rng, 32, 40, s)
    u, _, vh = np.linalg.svd(x, full_matrices=False)
    out = np.asarray(
      _spectral_power(jnp.asarray(x, jnp.float32), 0.125), np.float64
    )
    got = u[:, -1] @ out @ vh[-1] / ratio**0.125
    assert abs(got - expected) < tol, (ratio, got)


def test_small_cutoff_is_supported():
  # spectral_eps = 1e-5 used to fail in the coefficient LP for k >= 64; any
  # eps in (0, 1) designs (below 1e-3 the accurate interval stays [1e-3, 1]).
  assert polynomial.design_interval(1e-5) == polynomial.MIN_LOWER
  assert polynomial.design_interval(0.01) == 0.01
  x = CASES["span_1e3"]
  opt = htmuon_jax.htmuon(0.1, method="polynomial", spectral_eps=1e-5)
  params = {"w": jnp.asarray(x, jnp.float32)}
  updates, _ = opt.update(params, opt.init(params), params)
  chex.assert_tree_all_finite(updates)
  with pytest.raises(ValueError, match="eps"):
    htmuon_jax.htmuon(0.1, method="polynomial", spectral_eps=1.5)


def test_zeros_give_exact_zeros():
  for shape in ((8, 12), (2, 5, 3)):
    for power in (0.0, 0.125):
      out = _spectral_power(jnp.zeros(shape), power)
      chex.assert_trees_all_equal(out, jnp.zeros(shape))


def test_rank_deficient_is_finite_and_close():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((48, 8)) @ rng.standard_normal((8, 64))
  for power in (0.0, 0.125, 0.5):
    out = _spectral_power(jnp.asarray(x, jnp.float32), power)
    chex.assert_tree_all_finite(out)
    # fp32 noise singular values (~1e-7 s_max) are not cut sharply as in the
    # reference: the polynomial maps them to ~s / MIN_LOWER <= 1e-2 of
    # s_max^p (measured 4e-3 at p = 0).
    assert rel_err(out, spectral_power_ref(x, power)) < 1e-2


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_tiny_and_huge_magnitudes(scale):
  x = np.random.default_rng(4).standard_normal((16, 24)).astype(np.float32)
  for power in (0.0, 0.125, 0.5):
    out = _spectral_power(jnp.asarray(x * np.float32(scale)), power)
    chex.assert_tree_all_finite(out)
    # Scaled by max|x| before any squaring: as accurate as at scale 1.
    ref = spectral_power_ref(x.astype(np.float64) * scale, power)
    assert rel_err(out, ref) < 1e-4


def test_bf16_input():
  x = np.random.default_rng(5).standard_normal((32, 48)).astype(np.float32)
  xb = jnp.asarray(x, jnp.bfloat16)
  for power in (0.0, 0.125, 0.5):
    out = _spectral_power(xb, power)
    chex.assert_type(out, jnp.bfloat16)
    # Computed in fp32: the only bf16 costs are rounding the input (which
    # moves the exact answer) and the output (8-bit mantissa, ~0.2% rms);
    # measured 0.25%.
    assert (
      rel_err(np.asarray(out, np.float32), spectral_power_ref(x, power)) < 0.01
    )


def test_jit_vmap_and_determinism():
  x = jnp.asarray(CASES["batched"], jnp.float32)
  eager = _spectral_power(x, 0.125)
  jitted = jax.jit(lambda m: _spectral_power(m, 0.125))(x)
  mapped = jax.vmap(lambda m: _spectral_power(m, 0.125))(x)
  # Same iteration, but XLA may fuse and order the fp32 sums differently:
  # results differ by up to the method's own rounding error (~3e-5 measured
  # for this case), so each is checked against the reference instead.
  ref = spectral_power_ref(CASES["batched"], 0.125)
  for out in (eager, jitted, mapped):
    assert rel_err(out, ref) < 1e-4
  chex.assert_trees_all_equal(_spectral_power(x, 0.125), eager)


def test_traced_power_or_eps_raises():
  x = jnp.ones((4, 6))
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(lambda p: _spectral_power(x, p))(0.125)
  with pytest.raises(ValueError, match="eps"):
    jax.jit(lambda e: _spectral_power(x, 0.125, eps=e))(1e-4)
  with pytest.raises(ValueError, match="eps"):
    _spectral_power(x, 0.125, eps=0.0)


# accurate: the method's 1e-4 contract; fast: 4 u (u = 2^-8, bf16's unit
# roundoff), the bound of test_fast_precision_vs_float64_svd for this
# well-conditioned matrix (its bf16 floor is ~2e-3).
@pytest.mark.parametrize(
  "precision,tol", [("accurate", 1e-4), ("fast", 4 * 2.0**-8)]
)
def test_optimizer_with_injected_hyperparams(precision, tol):
  params = {"w": jnp.asarray(CASES["wide"], jnp.float32), "b": jnp.zeros(96)}
  grads = jax.tree.map(lambda p: jnp.sin(3.0 * p) + 0.1, params)

  def step(method, **kw):
    opt = optax.inject_hyperparams(
      htmuon_jax.htmuon, static_args=("power", "spectral_eps")
    )(learning_rate=0.03, power=0.125, method=method, **kw)
    state = opt.init(params)
    return jax.jit(opt.update)(grads, state, params)[0]

  updates = step(htmuon_jax.methods.Polynomial(precision=precision))
  chex.assert_tree_all_finite(updates)
  # Same optimizer with the exact SVD (itself checked against float64).
  expected = step("svd")
  assert rel_err(updates["w"], expected["w"]) < tol
  chex.assert_trees_all_close(updates["b"], expected["b"])


def test_newton_schulz_fast_precision():
  # bf16-operand products: Muon's quintic does not converge (it settles in a
  # band around 1), so rounding is not absorbed: each of the 15 products
  # adds up to ~u (bf16's unit roundoff 2^-8) of relative error, at most
  # 15 u ~ 5.9% in all (measured 3.6%).
  x = jnp.asarray(CASES["tall"], jnp.float32)
  ref = htmuon_jax.methods._newton_schulz.newton_schulz(x)
  fast = jax.vmap(
    lambda m: htmuon_jax.methods._newton_schulz.newton_schulz(
      m, precision="fast"
    )
  )(jnp.stack([x, x]))
  chex.assert_type(fast, jnp.float32)
  for out in fast:
    assert 1e-5 < rel_err(out, np.asarray(ref, np.float64)) < 15 * 2.0**-8
  with pytest.raises(ValueError, match="precision"):
    htmuon_jax.methods._newton_schulz.newton_schulz(x, precision="bf16")


def test_design_runs_at_construction(monkeypatch):
  from htmuon_jax import _minimax as minimax

  calls = []
  real = minimax.design
  monkeypatch.setattr(
    minimax, "design", lambda *a, **k: calls.append(a) or real(*a, **k)
  )
  opt = htmuon_jax.htmuon(0.1, power=0.3, method="polynomial")
  assert calls == [(0.3, polynomial.MIN_LOWER)]  # At construction.
  misses = real.cache_info().misses
  params = {"w": jnp.ones((8, 12)) + jnp.eye(8, 12)}
  jax.jit(opt.update)(params, opt.init(params), params)
  # Tracing the step only looks the design up: no new linear program.
  assert real.cache_info().misses == misses
  assert set(calls) == {(0.3, polynomial.MIN_LOWER)}
  with pytest.raises(ValueError, match="precision"):
    htmuon_jax.methods.Polynomial(precision="bf16")


def test_auto_resolution(monkeypatch):
  resolve = htmuon_jax.methods.resolve_method
  assert resolve("auto", 0.125) == (
    "svd" if jax.default_backend() == "cpu" else "express"
  )
  # On GPU/TPU: the product method at Muon's FLOPs (BENCHMARKS.md, "Spectral
  # power at Muon's cost": same validation loss as svd within the seeds).
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert resolve("auto", 0.125, 1e-4) == "express"
  # A traced power (inject_hyperparams under jit) needs an SVD.
  methods = []
  jax.jit(lambda p: methods.append(resolve("auto", p)))(0.1)
  assert methods == ["svd"]


@pytest.mark.parametrize(
  "precision,backend,expected",
  [
    ("auto", "cpu", "accurate"),
    ("auto", "gpu", "fast"),
    ("auto", "tpu", "fast"),
    ("accurate", "gpu", "accurate"),
    ("fast", "cpu", "fast"),
  ],
)
def test_resolve_precision(precision, backend, expected):
  from htmuon_jax import _checks as checks

  assert checks.resolve_precision(precision, backend) == expected
  with pytest.raises(ValueError, match="precision"):
    checks.resolve_precision("bf16", backend)


def _bf16_share(fn, x) -> float:
  dots = _dots(jax.jit(fn).lower(x).compiler_ir("hlo").as_hlo_text())
  return sum(f for f, dt in dots if dt == "bf16") / sum(f for f, _ in dots)


def test_auto_precision_is_accurate_on_cpu_and_fast_on_accelerators(
  monkeypatch,
):
  x = jnp.asarray(CASES["wide"], jnp.float32)
  # On CPU (this machine) the default is the accurate numbers, bit for bit.
  assert jax.default_backend() == "cpu"
  chex.assert_trees_all_equal(
    _spectral_power(x, 0.125), _spectral_power(x, 0.125, precision="accurate")
  )
  assert _bf16_share(lambda m: _spectral_power(m, 0.125), x) == 0.0
  # Where JAX's default backend is a GPU, the same call traces bf16 products.
  # (Only the power iteration's matrix-vector products stay fp32.)
  fast = _bf16_share(lambda m: _spectral_power(m, 0.125, precision="fast"), x)
  assert fast > 0.99
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert _bf16_share(lambda m: _spectral_power(m, 0.125), x) == fast
  explicit = lambda m: _spectral_power(m, 0.125, precision="accurate")
  assert _bf16_share(explicit, x) == 0.0


@pytest.mark.parametrize("precision,fast", [(None, True), ("accurate", False)])
def test_method_auto_passes_precision_on_accelerators(
  monkeypatch, precision, fast
):
  # method="auto" resolves to a product method ("express") on a GPU/TPU
  # backend, at the precision the optimizer was given (default "auto":
  # "fast" there).
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  method = (
    "auto"
    if precision is None
    else htmuon_jax.methods.Auto(precision=precision)
  )
  opt = htmuon_jax.htmuon(learning_rate=0.03, method=method)
  params = {"w": jnp.asarray(CASES["wide"], jnp.float32)}
  state = opt.init(params)
  fn = lambda g: opt.update(g, state, params)[0]["w"]
  share = _bf16_share(fn, params)
  assert share > 0.99 if fast else share == 0.0


def test_fast_precision_on_a_transposed_batched_leaf_runs_on_cpu():
  # An embedding read vocab -> d, alone in its group: its matrix is a
  # transpose reshaped to (1, d, vocab). XLA's CPU runtime rejected the bf16
  # dots of that operand ("Unsupported element type for DotThunk").
  x = jax.random.normal(jax.random.key(0), (103, 32))
  method = htmuon_jax.methods._polynomial.Polynomial(precision="fast")
  got = jax.jit(
    lambda x: htmuon_jax.spectral_power(x.T[None], 0.125, method=method)
  )(x)
  same = jax.jit(
    lambda x: htmuon_jax.spectral_power(
      jnp.swapaxes(x[None], 1, 2), 0.125, method=method
    )
  )(x)
  chex.assert_trees_all_close(got, same, rtol=1e-6, atol=1e-6)
  opt = htmuon_jax.htmuon(
    0.01,
    method=htmuon_jax.methods.Polynomial(precision="fast"),
    muon_weight_dimension_numbers={
      "w": htmuon_jax.MuonDimensionNumbers((1,), (0,))
    },
  )
  tree = {"w": x}
  updates, _ = jax.jit(opt.update)(tree, opt.init(tree), tree)
  chex.assert_tree_all_finite(updates)
