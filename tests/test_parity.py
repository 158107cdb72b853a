"""Parity with `optax.contrib.muon` and with the HTMuon authors' rules.

* `optax.inject_hyperparams` without `static_args`, as optax's muon allows
  (integer hyperparameters arrive as traced arrays).
* Complex parameters, as optax's muon supports them.
* What "reproduces `optax.contrib.muon`" means, measured: bitwise where it
  holds, fp32 round-off elsewhere.
* The authors' PyTorch rules (interval step counter, streaming orientation,
  plain AdamW beside Nesterov matrices), each against a numpy float64
  transcription of their code written here, independent of the package.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import htmuon_jax

# fp32 unit round-off.
U32 = float(np.finfo(np.float32).eps) / 2


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.complex128), np.asarray(b, np.complex128)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def svd_power_ref(x, p, eps=1e-4):
  """`U diag(s**p) V^H` in float64 / complex128, cutoff `s <= eps s_max`."""
  x = np.asarray(x)
  x = x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)
  u, s, vh = np.linalg.svd(x, full_matrices=False)
  keep = s > eps * s.max()
  f = np.where(keep, np.where(keep, s, 1.0) ** p, 0.0)
  return (u * f) @ vh


def tree(rng, shapes, dtype=np.float32, scale=1.0):
  return {
    k: jnp.asarray(scale * rng.standard_normal(s), dtype)
    for k, s in shapes.items()
  }


SHAPES = {"w": (6, 4), "v": (3, 5), "b": (4,)}
SMALL = {"w": (5, 4), "b": (4,)}


def run(opt, params, grads):
  state = opt.init(params)
  step = jax.jit(opt.update)
  outs = []
  for g in grads:
    u, state = step(g, state, params)
    outs.append(u)
  return outs, state


# ---------------------------------------------------------------------------
# inject_hyperparams without static_args.

ALIASES = {
  "htmuon": htmuon_jax.htmuon,
  "muon": htmuon_jax.muon,
  "htnormuon": htmuon_jax.htnormuon,
  "htadamuon": htmuon_jax.htadamuon,
  "rmnp": htmuon_jax.rmnp,
}


@pytest.mark.parametrize(
  "name, kwargs",
  [
    *((name, {}) for name in ALIASES),
    ("htmuon", {"interval": 2}),  # an injected integer on the lax.cond path
  ],
)
def test_inject_hyperparams_without_static_args(name, kwargs):
  rng = np.random.default_rng(0)
  params = tree(rng, SMALL)
  grads = [tree(rng, SMALL) for _ in range(3)]
  alias = ALIASES[name]
  injected, state = run(
    optax.inject_hyperparams(alias)(learning_rate=0.02, **kwargs), params, grads
  )
  plain, _ = run(alias(0.02, **kwargs), params, grads)
  # Integers (ns_steps, interval) were injected as arrays.
  ints = [
    k
    for k, v in state.hyperparams.items()
    if jnp.issubdtype(v.dtype, jnp.integer)
  ]
  assert ints or name == "rmnp", state.hyperparams.keys()
  for a, b in zip(injected, plain):
    # Same program but for hyperparameters as fp32 arrays instead of Python
    # constants: equal to a few fp32 round-offs (Newton-Schulz amplifies
    # relative perturbations by at most 3.4445 per step: 3.4445**5 u).
    for k in SMALL:
      assert rel_err(a[k], b[k]) < 3.4445**5 * U32, (k, rel_err(a[k], b[k]))


def test_injected_ns_steps_is_a_traced_loop_bound():
  rng = np.random.default_rng(1)
  params = tree(rng, SMALL)
  grads = [tree(rng, SMALL) for _ in range(2)]
  opt = optax.inject_hyperparams(htmuon_jax.muon)(learning_rate=0.02)
  traces = []

  def update(g, s, p):
    traces.append(1)
    return opt.update(g, s, p)

  step = jax.jit(update)
  state = opt.init(params)
  state.hyperparams["ns_steps"] = jnp.asarray(2)
  outs = []
  for g in grads:
    u, state = step(g, state, params)
    outs.append(u)
  assert len(traces) == 1  # changing ns_steps did not recompile
  ref, _ = run(optax.contrib.muon(0.02, ns_steps=2), params, grads)
  five, _ = run(optax.contrib.muon(0.02), params, grads)
  for a, b, c in zip(outs, ref, five):
    assert rel_err(a["w"], b["w"]) < 3.4445**2 * 8 * U32  # fp32, 2 NS steps
    assert rel_err(a["w"], c["w"]) > 1e-2  # really 2 steps, not 5


def test_stream_rank_on_the_method_object_under_inject_hyperparams():
  # The rank is a field of the method object, which inject_hyperparams
  # passes through as it is (no static_args needed).
  params = {"w": jnp.ones((4, 3))}
  opt = optax.inject_hyperparams(htmuon_jax.htmuon)(
    learning_rate=0.02, method=htmuon_jax.methods.Stream(rank=2)
  )
  state = opt.init(params)
  assert (1, 3, 2) in [x.shape for x in jax.tree.leaves(state)]  # the basis


# ---------------------------------------------------------------------------
# Complex parameters.


def complex_matrix(rng, shape):
  return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(
    np.complex64
  )


# complex64 SVD / eigh are backward stable: error ~ n u with n <= 8 here.
# The polynomial method's fp32 error on Gaussian matrices is bounded by 1e-3
# in tests/test_polynomial.py (~1e-4 typical; 1.7e-4 for one complex 6 x 4
# case here, 6e-5 for a real 6 x 4 matrix with the same singular values).
@pytest.mark.parametrize(
  "method, tol", [("svd", 64 * U32), ("eigh", 64 * U32), ("polynomial", 1e-3)]
)
@pytest.mark.parametrize("power", [0.0, 0.125, 0.5])
@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_complex_spectral_power_matches_complex128_svd(
  method, tol, power, shape
):
  x = complex_matrix(np.random.default_rng(2), shape)
  out = htmuon_jax.spectral_power(jnp.asarray(x), power, method=method)
  assert out.dtype == jnp.complex64
  assert rel_err(out, svd_power_ref(x, power)) < tol


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
def test_complex_newton_schulz_is_unitary(shape):
  # optax's test: coefficients that converge, many steps.
  x = complex_matrix(np.random.default_rng(3), shape)
  out = htmuon_jax.spectral_power(
    jnp.asarray(x),
    0.0,
    method=htmuon_jax.methods.NewtonSchulz(coeffs=(2.0, -1.5, 0.5), steps=20),
  )
  assert rel_err(out, svd_power_ref(x, 0.0)) < 64 * U32  # converged: fp32


def test_complex_row_norm():
  x = complex_matrix(np.random.default_rng(4), (5, 3))
  out = htmuon_jax.scale_by_row_norm(0.0).update(
    {"w": jnp.asarray(x)}, optax.EmptyState()
  )[0]["w"]
  x128 = x.astype(np.complex128)
  ref = x128 / np.sqrt(np.sum(np.abs(x128) ** 2, axis=0, keepdims=True))
  assert rel_err(out, ref) < 8 * U32  # one norm and a division in complex64


def test_complex_stream_raises():
  tx = htmuon_jax.scale_by_htmuon(method="stream")
  x = {"w": jnp.asarray(complex_matrix(np.random.default_rng(5), (4, 3)))}
  with pytest.raises(ValueError, match='method="stream".*complex'):
    tx.update(x, tx.init(x))


def _mixed_target_complex():
  """optax's `_setup_mixed_tensor_target_complex`."""
  final = jnp.array(
    [[1.0 + 2.0j, 0.0], [-1.0 + 1.0j, 1.0 - 3.0j]], dtype=jnp.complex64
  )
  return (
    jnp.zeros((2, 2), jnp.complex64),
    final,
    (lambda p: jnp.sum(jnp.abs(p - final) ** 2)),
  )


@pytest.mark.parametrize(
  "name, kwargs",
  [
    ("muon", {"adaptive": False, "nesterov": True}),
    ("muon", {"adaptive": True, "nesterov": False}),
    ("htmuon", {}),
    ("htmuon", {"method": "polynomial"}),
    ("htnormuon", {}),
    ("htadamuon", {}),
    ("rmnp", {}),
  ],
)
def test_complex_mixed_target(name, kwargs):
  """optax's `test_complex_mixed_target`, for every alias."""
  # AdaMuon's updates have RMS 0.2 (not ~0.5): 1000 steps of 1e-2 would
  # move each entry by ~2 < |1 - 3j|, so it takes a 5x larger rate.
  opt = ALIASES[name](5e-2 if name == "htadamuon" else 1e-2, **kwargs)
  params, final, loss = _mixed_target_complex()

  def step(carry, _):
    params, state = carry
    g = jax.tree.map(jnp.conj, jax.grad(loss)(params))
    u, state = opt.update(g, state, params)
    return (optax.apply_updates(params, u), state), None

  (params, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=1000))(
    (params, opt.init(params))
  )
  chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------------------
# "Reproduces optax.contrib.muon": what holds.


# Both optimizers, each jitted once for all the tests below (same shapes).
_PAIR = [
  (opt, jax.jit(opt.update))
  for opt in (htmuon_jax.muon(0.02), optax.contrib.muon(0.02))
]


def _muon_pair(params, grads):
  outs = []
  for opt, step in _PAIR:
    state, us = opt.init(params), []
    for g in grads:
      u, state = step(g, state, params)
      us.append(u)
    outs.append(us)
  return outs


def test_muon_bitwise_when_max_entry_in_half_one():
  # Each matrix's largest entry in [0.5, 1): the exact power-of-two scaling
  # before Newton-Schulz is the identity and the two programs compute the
  # same fp32 operations.
  rng = np.random.default_rng(6)
  params = tree(rng, SHAPES)
  grads = []
  for _ in range(3):
    g = {
      k: rng.uniform(-0.9, 0.9, s).astype(np.float32) for k, s in SHAPES.items()
    }
    grads.append({k: jnp.asarray(v) for k, v in g.items()})
  ours, theirs = _muon_pair(params, grads)
  for t, (a, b) in enumerate(zip(ours, theirs)):
    # Momenta after step 1 stay within [0.5, 1) in max-abs only by chance:
    # check the first step's matrices bitwise, every step's AdamW leaf.
    if t == 0:
      chex.assert_trees_all_equal(a, b)
    chex.assert_trees_all_equal(a["b"], b["b"])


# Momenta of norm >= 1: optax's eps = 1e-8 is below half an ulp of the norm
# in both programs (for smaller norms it is not: see the next test).
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_muon_matches_optax_to_fp32_round_off(scale):
  rng = np.random.default_rng(7)
  params = tree(rng, SHAPES)
  grads = [tree(rng, SHAPES, scale=scale) for _ in range(3)]
  ours, theirs = _muon_pair(params, grads)
  for a, b in zip(ours, theirs):
    chex.assert_trees_all_equal(a["b"], b["b"])  # the same optax.adamw
    for k in ("w", "v"):
      # Different compiled programs (the power-of-two scaling): each
      # Newton-Schulz step amplifies a relative perturbation by at most its
      # slope 3.4445, so 5 steps turn fp32 round-off u into 3.4445**5 u.
      assert rel_err(a[k], b[k]) < 3.4445**5 * U32


def test_muon_is_scale_invariant_where_optax_is_not():
  # The one deliberate difference: optax's x / (||x|| + 1e-8) lets eps act
  # on small momenta; here each matrix is first scaled by a power of two.
  rng = np.random.default_rng(8)
  params = tree(rng, SHAPES)
  grads = [tree(rng, SHAPES)]
  tiny = [jax.tree.map(lambda g: g * 2.0**-26, grads[0])]
  ours, theirs = _muon_pair(params, grads)
  ours_tiny, theirs_tiny = _muon_pair(params, tiny)
  for k in ("w", "v"):
    chex.assert_trees_all_equal(ours_tiny[0][k], ours[0][k])
    assert rel_err(theirs_tiny[0][k], theirs[0][k]) > 1e-2


# ---------------------------------------------------------------------------
# The authors' rules, transcribed from their PyTorch classes (torch layout:
# W is (out, in), the Flax kernel is W^T).


def authors_svd_power(n, p):
  u, s, vh = np.linalg.svd(n, full_matrices=False)
  return (u * s**p) @ vh


class AuthorsHTMuon:
  """Their HTMuon step for one (out, in) matrix, interval mode optional."""

  def __init__(self, w, lr, p, wd=0.0, beta=0.95, interval=None):
    self.w = np.array(w, np.float64)
    self.m = np.zeros_like(self.w)
    self.step = 0
    self.lr, self.p, self.wd, self.beta, self.k = lr, p, wd, beta, interval

  def __call__(self, g):
    g = np.asarray(g, np.float64)
    self.step += 1  # incremented before the interval test
    self.m = self.beta * self.m + (1 - self.beta) * g
    n = self.beta * self.m + (1 - self.beta) * g
    ht = self.k is None or self.step % self.k == 0
    # Muon's steps: the exact polar factor (their bf16 Newton-Schulz is an
    # approximation of it; `authors_htmuon` runs interval_method="svd").
    o = authors_svd_power(n, self.p if ht else 0.0)
    out, inp = self.w.shape
    o = o * np.sqrt(max(1.0, out / inp))
    self.w = self.w * (1 - self.lr * self.wd) - self.lr * o
    return self.w


def authors_htmuon(
  lr,
  power,
  *,
  weight_decay=0.0,
  adam_lr=1e-3,
  adam_nesterov=False,
  interval=None,
  interval_first=False,
):
  """The HTMuon authors' optimizer from the package's pieces, as
  docs/composing.md builds it: their momentum (no bias correction) and an
  exact SVD for every step, Nesterov matrices, AdamW (0.9, 0.95, 1e-10)
  for the other leaves."""
  return htmuon_jax.partition_matrices(
    lambda dims: optax.chain(
      htmuon_jax.scale_by_htmuon(
        power,
        0.95,
        bias_correction=False,
        method="svd",
        interval=interval,
        interval_method="svd",
        interval_first=interval_first,
        weight_dimension_numbers=dims,
      ),
      htmuon_jax.scale_by_shape(weight_dimension_numbers=dims),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(lr),
    ),
    optax.adamw(
      adam_lr,
      b1=0.9,
      b2=0.95,
      eps=1e-10,
      weight_decay=weight_decay,
      nesterov=adam_nesterov,
    ),
  )


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("torch_shape", [(4, 6), (6, 4)])
def test_interval_counter_is_the_authors(first, torch_shape):
  k, lr, wd = 3, 0.05, 0.1
  rng = np.random.default_rng(9)
  w0 = rng.standard_normal(torch_shape)
  gs = [rng.standard_normal(torch_shape) for _ in range(7)]
  ref = AuthorsHTMuon(w0, lr, 0.25, wd, interval=k)
  opt = authors_htmuon(
    lr, 0.25, weight_decay=wd, interval=k, interval_first=first
  )
  params = {"kernel": jnp.asarray(w0.T, jnp.float32)}
  state = opt.init(params)
  step = jax.jit(opt.update)
  errs = []
  for g in gs:
    w_ref = ref(g)
    u, state = step({"kernel": jnp.asarray(g.T, jnp.float32)}, state, params)
    params = optax.apply_updates(params, u)
    errs.append(np.abs(np.asarray(params["kernel"]).T - w_ref).max())
  if first:
    # The other rule: HT steps on updates 1, 4, 7 instead of 3, 6.
    assert max(errs) > 1e-3, errs
  else:
    # |W| ~ 1, 7 updates of size lr each with fp32 SVD error ~ 1e-6 relative.
    assert max(errs) < 1e-5, errs


def authors_stream(ns, p, k):
  """Their streaming power iteration on a sequence of (out, in) momenta."""
  v = np.eye(ns[0].shape[1], k)  # V_0: first k columns of I (fan_in side)
  outs = []
  for n in ns:
    v, _ = np.linalg.qr(n.T @ (n @ v))
    nv = n @ v
    u = nv / np.linalg.norm(nv, axis=0, keepdims=True)
    s = np.clip(np.diag(u.T @ n @ v), 0.0, None)
    f = np.where(s <= 1e-8, 0.0, np.where(s <= 1e-8, 1.0, s) ** p)
    outs.append((u * f) @ v.T)
  return outs


@pytest.mark.parametrize(
  "torch_shape, rank", [((6, 6), 6), ((6, 6), 3), ((4, 8), 4), ((8, 4), 2)]
)
def test_stream_orientation_is_the_authors(torch_shape, rank):
  rng = np.random.default_rng(10)
  base = rng.standard_normal(torch_shape)
  # Slowly changing momenta, as in training.
  ns = [base + 0.1 * rng.standard_normal(torch_shape) for _ in range(4)]
  refs = authors_stream(ns, 0.125, rank)

  def ours(side):
    tx = htmuon_jax.scale_by_spectral_power(
      0.125, method=htmuon_jax.methods.Stream(rank=rank, side=side)
    )
    state = tx.init({"w": jnp.zeros(torch_shape[::-1])})
    step = jax.jit(tx.update)
    outs = []
    for n in ns:
      o, state = step({"w": jnp.asarray(n.T, jnp.float32)}, state)
      outs.append(np.asarray(o["w"]).T)
    return outs, state

  outs, state = ours("fan_in")
  assert state.basis["w"].shape == (1, torch_shape[1], rank)  # fan_in side
  for o, r in zip(outs, refs):
    # fp32 products and QR on well-separated spectra: ~1e2 u per step.
    assert rel_err(o, r) < 1e-5
  if torch_shape[0] <= torch_shape[1] and rank < min(torch_shape):
    # The default basis sits on the other side here: other iterates.
    smaller, _ = ours("smaller")
    assert rel_err(smaller[0], refs[0]) > 1e-2


class AuthorsAdamW:
  """torch.optim.AdamW on one tensor (bias-corrected, decoupled decay)."""

  def __init__(self, w, lr, b1, b2, eps, wd):
    self.w = np.array(w, np.float64)
    self.m = np.zeros_like(self.w)
    self.v = np.zeros_like(self.w)
    self.t = 0
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, wd

  def __call__(self, g):
    g = np.asarray(g, np.float64)
    self.t += 1
    self.w = self.w * (1 - self.lr * self.wd)
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    denom = np.sqrt(self.v) / np.sqrt(1 - self.b2**self.t) + self.eps
    self.w = self.w - self.lr / (1 - self.b1**self.t) * self.m / denom
    return self.w


@pytest.mark.parametrize("adam_nesterov", [False, True])
def test_authors_full_optimizer(adam_nesterov):
  """Nesterov HTMuon for matrices, plain AdamW (0.9/0.95, 1e-10) for gains."""
  lr, adam_lr, wd = 0.03, 1e-3, 0.1
  rng = np.random.default_rng(11)
  w0, s0 = rng.standard_normal((4, 6)), 1.0 + 0.1 * rng.standard_normal(4)
  gs = [(rng.standard_normal((4, 6)), rng.standard_normal(4)) for _ in range(4)]
  ref_w, ref_s = (
    AuthorsHTMuon(w0, lr, 0.125, wd),
    AuthorsAdamW(s0, adam_lr, 0.9, 0.95, 1e-10, wd),
  )
  opt = authors_htmuon(
    lr, 0.125, weight_decay=wd, adam_lr=adam_lr, adam_nesterov=adam_nesterov
  )
  params = {
    "kernel": jnp.asarray(w0.T, jnp.float32),
    "scale": jnp.asarray(s0, jnp.float32),
  }
  state = opt.init(params)
  step = jax.jit(opt.update)
  for gw, gs_ in gs:
    w_ref, s_ref = ref_w(gw), ref_s(gs_)
    u, state = step(
      {
        "kernel": jnp.asarray(gw.T, jnp.float32),
        "scale": jnp.asarray(gs_, jnp.float32),
      },
      state,
      params,
    )
    params = optax.apply_updates(params, u)
    # |W| ~ 1: fp32 round-off of the parameters plus lr * 1e-6.
    np.testing.assert_allclose(params["kernel"], w_ref.T, rtol=0, atol=1e-5)
    s_err = np.abs(np.asarray(params["scale"]) - s_ref).max()
    if adam_nesterov is False:
      assert s_err < 1e-6  # fp32 parameters of size ~1
  if adam_nesterov:
    assert s_err > 1e-5  # optax's tie: Nesterov AdamW differs
