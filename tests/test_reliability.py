"""Reliability: edge-case matrices, non-finite gradients, determinism, long runs.

Every method and every alias the package exports is covered; methods and
aliases are discovered from the package so new ones are tested automatically.
"""

import os
import pathlib
import subprocess
import sys
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import htmuon_jax
from tests.reference import matrix_with_spectrum, rel_err, spectral_power_ref

# Documented accuracy on well-conditioned inputs (see docs/reliability.md).
EXACT_TOL = {"svd": 1e-5, "eigh": 1e-4, "polynomial": 1e-3}
EXACT_METHODS = sorted(EXACT_TOL)
# Rank-deficient inputs in fp32 carry noise singular values ~1e-7 s_max, far
# below the cutoff: svd/eigh cut them exactly, the polynomial method fades
# them towards 0 instead (documented: ~4e-3 against the hard-cut reference).
RANK_DEFICIENT_TOL = dict(EXACT_TOL, polynomial=5e-3)
RANK_DEFICIENT_CASES = ("rank1",)
ALL_METHODS = EXACT_METHODS + ["newton_schulz", "express"]


def _edge_cases():
  rng = np.random.default_rng(0)
  u, v = rng.standard_normal(7), rng.standard_normal(5)
  q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  return {
    "rank1": np.outer(u, v),
    "row": rng.standard_normal((1, 9)),
    "column": rng.standard_normal((9, 1)),
    "row_8192": rng.standard_normal((1, 8192)),
    "identity": np.eye(5),
    "scaled_orthogonal": 3.0 * q,
    "repeated": matrix_with_spectrum(rng, 8, 6, [2, 2, 2, 1, 1, 0.5]),
    "tiny": 1e-30 * rng.standard_normal((4, 6)),
    "huge": 1e30 * rng.standard_normal((6, 4)),
  }


EDGE = _edge_cases()


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("case", sorted(EDGE))
@pytest.mark.parametrize("power", [0.0, 0.125, 0.5])
def test_edge_case_matrices(method, case, power):
  x = EDGE[case]
  out = htmuon_jax.spectral_power(
    jnp.asarray(x, jnp.float32), power, method=method
  )
  chex.assert_tree_all_finite(out)
  tol = RANK_DEFICIENT_TOL if case in RANK_DEFICIENT_CASES else EXACT_TOL
  assert rel_err(out, spectral_power_ref(x, power)) < tol[method]


@pytest.mark.parametrize("case", sorted(EDGE))
def test_edge_case_matrices_newton_schulz(case):
  out = htmuon_jax.spectral_power(
    jnp.asarray(EDGE[case], jnp.float32), 0.0, method="newton_schulz"
  )
  chex.assert_tree_all_finite(out)
  # Muon's quintic leaves singular values in a band around one.
  s = np.linalg.svd(np.asarray(out, np.float64), compute_uv=False)
  assert 0.5 < s.max() < 1.3


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("shape", [(4, 6), (1, 8192), (3, 1, 5)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zeros_and_denormals_give_exact_zeros(method, shape, dtype):
  for value in (0.0, 1e-40):  # 1e-40 is an fp32 denormal (flushed on CPU)
    x = jnp.full(shape, value, dtype)
    power = 0.0 if method == "newton_schulz" else 0.125
    out = htmuon_jax.spectral_power(x, power, method=method)
    chex.assert_type(out, dtype)
    if value == 0.0:
      chex.assert_trees_all_equal(out, jnp.zeros(shape, dtype))
    chex.assert_tree_all_finite(out)


@pytest.mark.parametrize("method", EXACT_METHODS)
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_bf16_extreme_magnitudes(method, scale):
  rng = np.random.default_rng(1)
  x = jnp.asarray(scale * rng.standard_normal((8, 12)), jnp.bfloat16)
  out = htmuon_jax.spectral_power(x, 0.125, method=method)
  chex.assert_tree_all_finite(out)
  ref = spectral_power_ref(np.asarray(x.astype(jnp.float32)), 0.125)
  # One bf16 rounding of the result (2^-8 relative) plus the method's error.
  assert rel_err(out.astype(jnp.float32), ref) < 1e-2 + EXACT_TOL[method]


ALIASES = list(htmuon_jax.ALIASES)


def _make(name, **kwargs):
  return getattr(htmuon_jax, name)(learning_rate=0.01, **kwargs)


def _alias_configs():
  """Every optimizer alias, and htmuon with each non-default method."""
  return [(n, {}) for n in ALIASES] + [
    ("htmuon", {"method": m})
    for m in ("eigh", "stream", "polynomial", "express")
  ]


CONFIGS = _alias_configs()
CONFIG_IDS = [f"{n}-{k.get('method', 'default')}" for n, k in CONFIGS]


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(2)
  f = lambda *s: jnp.asarray(0.3 * rng.standard_normal(s), dtype)
  return {"w1": f(8, 16), "b1": f(16), "w2": f(16, 4), "norm": f(4)}


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_non_finite_gradients_are_skipped_by_apply_if_finite(name, kwargs):
  """NaN/Inf gradients propagate (like optax); `optax.apply_if_finite` guards
  the whole state, this package's momentum and bases included."""
  params = _params()
  good = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
  bad = dict(good, w1=good["w1"].at[0, 0].set(jnp.nan))

  raw = _make(name, **kwargs)
  updates, _ = raw.update(bad, raw.init(params), params)
  assert not bool(jnp.all(jnp.isfinite(updates["w1"])))  # propagates

  opt = optax.apply_if_finite(_make(name, **kwargs), max_consecutive_errors=3)
  state = opt.init(params)
  update = jax.jit(opt.update)
  updates, state = update(good, state, params)
  before = state.inner_state
  for g in (bad, dict(good, w2=good["w2"].at[1, 1].set(jnp.inf))):
    updates, state = update(g, state, params)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
    chex.assert_trees_all_equal(state.inner_state, before)
  assert int(state.notfinite_count) == 2
  updates, state = update(good, state, params)
  chex.assert_tree_all_finite(updates)
  assert int(state.notfinite_count) == 0


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_bitwise_deterministic(name, kwargs):
  params = _params()
  rng = np.random.default_rng(3)
  grads = [
    jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params
    )
    for _ in range(3)
  ]

  def run():
    opt = _make(name, **kwargs)
    state, p = opt.init(params), params
    step = jax.jit(opt.update)
    for g in grads:
      u, state = step(g, state, p)
      p = optax.apply_updates(p, u)
    return p

  chex.assert_trees_all_equal(run(), run())


def _loss(params, x, y):
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  h = h * params["norm"][None, :1]
  return jnp.mean((h @ params["w2"] - y) ** 2)


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_long_run_bf16_tracks_the_fp32_run(name, kwargs):
  """300 jitted steps (lr 0.01, weight decay 0.1) with bf16 parameters
  (fp32 momentum for htmuon's default, the params' dtype otherwise): finite,
  the loss falls below half its start, and ends within 0.1 (absolute) of the same run in fp32 (the
  independent reference: bf16 rounds each step's parameters to 2^-8
  relative, which must not derail training)."""
  wd, steps = 0.1, 300
  mu_dtype = jnp.float32 if (name, kwargs) == ("htmuon", {}) else None
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((64, 4)), jnp.float32)

  def run(dtype):
    params = _params(dtype)
    opt = _make(name, weight_decay=wd, mu_dtype=mu_dtype, **kwargs)
    f32 = lambda p: jax.tree.map(lambda a: a.astype(jnp.float32), p)

    def body(carry, _):
      p, s = carry
      g = jax.grad(_loss)(f32(p), x, y)
      g = jax.tree.map(lambda a, b: a.astype(b.dtype), g, p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(
      body, (params, opt.init(params)), None, length=steps
    )
    return p, _loss(f32(params), x, y), _loss(f32(p), x, y)

  final, start, loss_bf16 = jax.jit(lambda: run(jnp.bfloat16))()
  _, _, loss_fp32 = jax.jit(lambda: run(jnp.float32))()
  start, loss_bf16, loss_fp32 = map(float, (start, loss_bf16, loss_fp32))
  chex.assert_tree_all_finite(final)
  assert loss_bf16 < 0.5 * start, (start, loss_bf16)
  assert abs(loss_bf16 - loss_fp32) < 0.1, (loss_bf16, loss_fp32)


# --- Hangs: cases that never returned run in a subprocess under a timeout.

HERE = pathlib.Path(__file__).resolve().parent


def _run_in_subprocess(args, timeout):
  """Runs `python args` on one CPU device; fails on a timeout (a hang)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("PYTEST_XDIST_WORKER", None)
  env["XLA_FLAGS"] = " ".join(
    f
    for f in env.get("XLA_FLAGS", "").split()
    if "force_host_platform_device_count" not in f
  )
  try:
    proc = subprocess.run(
      [sys.executable, *args],
      env=env,
      cwd=HERE.parent,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
    )
  except subprocess.TimeoutExpired as e:
    out = (e.stdout or b"")[-3000:]
    pytest.fail(
      f"hung: no result within {timeout} s ({args}); last output: {out!r}"
    )
  assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
  return proc.stdout


@pytest.mark.slow
def test_non_finite_inputs_never_hang():
  """Every method, alias and size with an Inf or NaN matrix, and
  `optax.apply_if_finite` past its error budget and under `jax.vmap`
  (`tests/reliability_cases.py`; they hung forever before the guard)."""
  out = _run_in_subprocess(
    [
      "-m",
      "pytest",
      "-q",
      "-p",
      "no:xdist",
      "-p",
      "no:cacheprovider",
      "-W",
      "ignore",
      str(HERE / "reliability_cases.py"),
    ],
    timeout=900,
  )
  summary = out.strip().splitlines()[-1]
  assert " passed" in summary and "skipped" not in summary, summary


@pytest.mark.parametrize("run", range(2))
def test_batched_svd_of_a_scanned_model_never_hangs(run):
  """Repeated jitted steps of seven stacked kernels with method="svd" on one
  CPU device, each process under a timeout (`tests/lapack_stress.py`): the
  batched LAPACK SVD deadlocked in ~1 of 9 such processes before every CPU
  batch ran one matrix per call."""
  del run
  out = _run_in_subprocess([str(HERE / "lapack_stress.py"), "10"], timeout=120)
  assert "step 9 done" in out, out


# --- Numerics that were wrong without any error.


def test_fp16_newton_schulz_normalizes_in_fp32():
  zero = htmuon_jax.methods._newton_schulz.newton_schulz(
    jnp.zeros((8, 8), jnp.float16)
  )
  chex.assert_trees_all_equal(zero, jnp.zeros((8, 8), jnp.float16))  # no NaN
  # ||ones(512, 512)||_F = 512 needs a sum of squares of 2^18 > fp16's max.
  flat = jnp.ones((512, 512), jnp.float16)
  for out in (
    htmuon_jax.methods._newton_schulz.newton_schulz(flat),
    htmuon_jax.spectral_power(flat, 0.0, method="newton_schulz"),
  ):
    want = htmuon_jax.methods._newton_schulz.newton_schulz(
      flat.astype(jnp.float32)
    )
    # Rank one: U V^T = ones / 512, times Muon's band factor; fp16 steps
    # round to 2^-11 relative, five of them ~1e-3.
    assert rel_err(out.astype(jnp.float32), want) < 1e-2
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32)))) > 1e-3


def _row_norm_ref(x, eps):
  x = np.asarray(x, np.float64)
  return x / (np.linalg.norm(x, axis=0, keepdims=True) + eps)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1.0, 1e19, 1e25, 1e30])
def test_rmnp_extreme_magnitudes(scale):
  g = np.random.default_rng(5).standard_normal((6, 4))
  x = jnp.asarray(scale * g, jnp.float32)
  out, _ = htmuon_jax.scale_by_row_norm(1e-8).update({"w": x}, None)
  # eps = 1e-8 dominates at 1e-30 (reference ~1e-22 entries); fp32 ~1e-7.
  assert rel_err(out["w"], _row_norm_ref(np.asarray(x), 1e-8)) < 1e-6
  opt = htmuon_jax.rmnp(1.0)  # lr 1: the update is -c N / (||N|| + eps)
  u, _ = opt.update({"w": x}, opt.init({"w": x}), {"w": x})
  want = -_row_norm_ref(1.95 * np.asarray(x, np.float64), 1e-8)  # N = 1.95 G
  assert rel_err(u["w"], want) < 1e-6


def _normuon_ref(os_, beta2=0.95, eps=1e-10):
  nu, outs = 0.0, []
  for o in os_:
    o = np.asarray(o, np.float64)
    nu = beta2 * nu + (1 - beta2) * np.mean(o * o, axis=0)
    normed = o / (np.sqrt(nu) + eps)
    outs.append(normed * np.linalg.norm(o) / np.linalg.norm(normed))
  return outs


@pytest.mark.parametrize("scale", [1e-30, 1e-10, 1.0, 1e18, 1e19, 1e20, 1e30])
def test_normuon_extreme_magnitudes(scale):
  rng = np.random.default_rng(6)
  xs = [
    jnp.asarray(scale * rng.standard_normal((6, 4)), jnp.float32)
    for _ in range(3)
  ]
  tx = htmuon_jax.scale_by_normuon()
  state, outs = tx.init({"w": xs[0]}), []
  for x in xs:
    out, state = tx.update({"w": x}, state)
    outs.append(out["w"])
  refs = _normuon_ref([np.asarray(x) for x in xs])
  # First step exact to fp32 round-off at every scale; later steps too while
  # the stored moment (~scale^2) fits in fp32 (documented: it saturates at
  # fp32's maximum above |O| ~ 1.8e19), then finite and of the right norm.
  assert rel_err(outs[0], refs[0]) < 1e-6
  for out, ref in zip(outs[1:], refs[1:]):
    chex.assert_tree_all_finite(out)
    if scale <= 1e18:
      assert rel_err(out, ref) < 1e-6
    np.testing.assert_allclose(
      np.linalg.norm(np.asarray(out, np.float64)),
      np.linalg.norm(ref),
      rtol=1e-5,
    )


@pytest.mark.parametrize("scale", [1e-30, 1e19, 1e20, 1e30])
def test_htnormuon_power_one_extreme_magnitudes(scale):
  g = {
    "w": jnp.asarray(
      scale * np.random.default_rng(7).standard_normal((6, 4)), jnp.float32
    )
  }
  opt = htmuon_jax.htnormuon(1.0, power=1.0)
  u, _ = opt.update(g, opt.init(g), g)
  chex.assert_tree_all_finite(u)
  # power 1 keeps O = N, the bias-corrected Nesterov momentum of one step:
  # N = (0.95 * 0.05 / (1 - 0.95**2) + 1) g. The first NorMuon step is
  # exact: compare with the float64 rule.
  n = (0.95 * 0.05 / (1 - 0.95**2) + 1) * np.asarray(g["w"], np.float64)
  want = _normuon_ref([n])[0]
  assert rel_err(-np.asarray(u["w"]), want) < 1e-6


def test_float64_inputs_are_computed_in_float64():
  rng = np.random.default_rng(8)
  g = rng.standard_normal((6, 4))
  with jax.enable_x64(True):
    for scale in (1e-100, 1.0, 1e200):
      x = jnp.asarray(scale * g, jnp.float64)
      for method in ("svd", "eigh"):
        out = htmuon_jax.spectral_power(x, 0.125, method=method)
        chex.assert_type(out, jnp.float64)
        # float64 round-off (the Gram matrix of eigh squares a condition
        # number of ~10 here); float32 gave ~1e-7 and 0 / NaN at 1e+-100s.
        assert rel_err(out, spectral_power_ref(np.asarray(x), 0.125)) < 1e-12
      # Documented: the polynomial method computes in float32 (scaled input,
      # so no under/overflow), float32-accurate.
      out = htmuon_jax.spectral_power(x, 0.125, method="polynomial")
      assert rel_err(out, spectral_power_ref(np.asarray(x), 0.125)) < 1e-3


def test_matrix_sign_of_inf_is_nan():
  tx = htmuon_jax._adamuon.scale_by_matrix_sign()
  x = jnp.asarray([[1.0, -2.0], [jnp.inf, -jnp.inf]])
  out, _ = tx.update({"w": x}, None)
  np.testing.assert_array_equal(np.asarray(out["w"][0]), [1.0, -1.0])
  assert bool(jnp.all(jnp.isnan(out["w"][1])))


def test_stream_low_rank_recovers_from_a_dead_unit():
  """rank=1 and a momentum that is zero on the first input unit: the first
  identity column (the authors' V_0) is orthogonal to it, the update was 0
  forever. From the random start, the iteration converges to the top
  singular triplet (gap 3 : 1, so (1/3)^(2t))."""
  rng = np.random.default_rng(9)
  a = matrix_with_spectrum(rng, 8, 5, [3.0, 1.0, 0.8, 0.5, 0.3])
  x = jnp.asarray(np.concatenate([np.zeros((8, 1)), a], axis=1), jnp.float32)
  tx = htmuon_jax.scale_by_spectral_power(
    0.25, method=htmuon_jax.methods.Stream(rank=1)
  )
  state, step = tx.init(x), jax.jit(tx.update)
  for _ in range(20):
    out, state = step(x, state)
  u, s, vh = np.linalg.svd(np.asarray(x, np.float64))
  want = s[0] ** 0.25 * np.outer(u[:, 0], vh[0])
  assert rel_err(out, want) < 1e-5  # fp32 round-off


def test_witness_marks_only_its_module_or_stacked_kernels():
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  params = {"mlp": {"kernel": f32(16, 24)}, "ls": {"scale": f32(16, 24)}}
  dims = htmuon_jax.resolve_dimension_numbers(None, params)
  assert dims["mlp"]["kernel"] == htmuon_jax.MuonDimensionNumbers(0, 1)
  assert dims["ls"]["scale"] is None
  # Inside a stack, the witness's sibling (3-D) kernels are still stacked.
  params = {
    "blocks": {"ls": {"scale": f32(16, 24)}, "mlp": {"kernel": f32(16, 24, 8)}},
    "head": {"kernel": f32(16, 24)},
  }
  dims = htmuon_jax.resolve_dimension_numbers(None, params)
  assert dims["blocks"]["mlp"]["kernel"] == htmuon_jax.MuonDimensionNumbers(
    1, 2
  )
  assert dims["head"]["kernel"] == htmuon_jax.MuonDimensionNumbers(0, 1)


def test_integer_matrix_raises():
  with pytest.raises(ValueError, match="x: .*floating"):
    htmuon_jax.spectral_power(jnp.ones((4, 4), jnp.int32), 0.125)


@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=CONFIG_IDS)
def test_zero_size_leaves_give_empty_updates(name, kwargs):
  params = {
    "a": jnp.ones((0, 5)),
    "b": jnp.ones((5, 0)),
    "c": jnp.ones((2, 0, 5)),
    "w": jnp.ones((4, 6)),
  }
  opt = _make(name, **kwargs)
  updates, _ = jax.jit(opt.update)(params, opt.init(params), params)
  chex.assert_trees_all_equal_shapes(updates, params)
  chex.assert_tree_all_finite(updates)


# --- Settings that harm: ValueError naming the argument, at construction.

BAD_SETTINGS = [
  ("consistent_rms", -0.2),
  ("mu_dtype", jnp.int32),
  ("learning_rate", None),
  ("ns_steps", 2.7),
  ("ns_steps", 0),
  ("ns_steps", True),
  ("adaptive", 1),
  ("adaptive", "yes"),
]
# Which aliases take which argument.
TAKES = {
  "htmuon": None,
  "muon": None,
  "htnormuon": None,
  "htadamuon": {"consistent_rms", "adaptive"},
  "rmnp": {"ns_steps", "adaptive"},
}


@pytest.mark.parametrize("name", ALIASES)
@pytest.mark.parametrize(
  "arg, value", BAD_SETTINGS, ids=[f"{a}={v!r}" for a, v in BAD_SETTINGS]
)
def test_harmful_settings_raise_naming_the_argument(name, arg, value):
  if arg in (TAKES[name] or ()):
    return  # not an argument of this alias
  kwargs = {"learning_rate": 0.01, arg: value}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # the ignored-option notes
    with pytest.raises(ValueError, match=arg):
      getattr(htmuon_jax, name)(**kwargs)


@pytest.mark.parametrize(
  "options, field",
  [
    (dict(rank=0), "rank"),
    (dict(rank=1.5), "rank"),
    (dict(qr="householder"), "qr"),
    (dict(side="out"), "side"),
  ],
)
def test_bad_stream_options_raise_naming_the_field(options, field):
  with pytest.raises(ValueError, match=field):
    htmuon_jax.methods.Stream(**options)


def test_ns_steps_may_be_an_array_or_traced():
  check = lambda n: htmuon_jax.methods.from_keywords(
    "newton_schulz", ns_steps=n
  )
  check(jnp.asarray(5))
  jax.jit(lambda n: check(n) and n)(5)


@pytest.mark.parametrize(
  "name, kwargs, ignored",
  [
    ("htmuon", dict(method="svd", preconditioning="aol"), "preconditioning"),
    ("htmuon", dict(ns_steps=3), "ns_steps"),
    ("htnormuon", dict(ns_coeffs="dion"), "ns_coeffs"),
    ("htadamuon", dict(method="stream", ns_steps=4), "ns_steps"),
  ],
)
def test_ignored_options_warn(name, kwargs, ignored):
  with pytest.warns(UserWarning, match=f"^{ignored} is ignored"):
    _make(name, **kwargs)


@pytest.mark.parametrize(
  "name, kwargs",
  [
    ("htmuon", dict(method=htmuon_jax.methods.Stream(rank=2, qr="cholesky"))),
    ("muon", dict(preconditioning="aol", ns_steps=4)),
    ("htmuon", dict(interval=5, preconditioning="aol", ns_coeffs="dion")),
    ("htmuon", {}),
  ],
)
def test_used_options_do_not_warn(name, kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    _make(name, **kwargs)


@pytest.mark.parametrize("power", [-0.5, 1.5, 2.0])
def test_injected_power_outside_unit_interval_gives_nan(power):
  """Documented (docs/reliability.md): a traced power outside [0, 1] makes
  the update NaN (it cannot raise under jit), so a bad schedule is seen."""
  x = jnp.asarray(
    np.random.default_rng(10).standard_normal((6, 4)), jnp.float32
  )
  tx = optax.inject_hyperparams(htmuon_jax.scale_by_spectral_power)(
    power=0.5, method="svd"
  )
  state = tx.init(x)
  state.hyperparams["power"] = jnp.asarray(power)
  out, _ = jax.jit(tx.update)(x, state)
  assert bool(jnp.all(jnp.isnan(out)))
  state.hyperparams["power"] = jnp.asarray(1.0)
  out, _ = jax.jit(tx.update)(x, state)
  assert rel_err(out, spectral_power_ref(np.asarray(x), 1.0)) < 1e-5
