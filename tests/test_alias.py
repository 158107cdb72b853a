"""The `htmuon` / `muon` aliases: the paper's rule, optax parity, jit, schedules."""

import dataclasses
import inspect
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import MuonDimensionNumbers as DN

import htmuon_jax
from tests.reference import nesterov_ref
from tests.reference import spectral_power_ref


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {"w1": f(8, 16), "b1": f(16), "w2": f(16, 4), "norm": f(4)}


def _grads(params, steps, seed=1):
  rng = np.random.default_rng(seed)
  return [
    jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params
    )
    for _ in range(steps)
  ]


def _run(opt, params, grads):
  state = opt.init(params)
  step = jax.jit(opt.update)
  for g in grads:
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_htmuon_matches_the_numpy_rule():
  """Several steps against a numpy transcription of the update rule (with
  optax's bias-corrected momentum; the authors' rule: test_parity.py)."""
  lr, wd, beta, p = 0.02, 0.1, 0.95, 0.125
  params = _params()
  grads = _grads(params, 5)
  opt = htmuon_jax.htmuon(lr, power=p, beta=beta, weight_decay=wd, method="svd")
  got, _ = _run(opt, params, grads)

  for name in ("w1", "w2"):
    w = np.asarray(params[name], np.float64)
    m = np.zeros_like(w)
    fan_in, fan_out = w.shape  # Flax (in, out) layout
    for t, g in enumerate(grads, 1):
      g = np.asarray(g[name], np.float64)
      m, n = nesterov_ref(m, g, beta, t)
      o = spectral_power_ref(n, p) * np.sqrt(max(1.0, fan_out / fan_in))
      w = w * (1 - lr * wd) - lr * o
    # fp32 parameters updated 5 times: round-off ~1e-6 relative.
    np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-6)

  # Non-matrix leaves take optax's AdamW branch (Nesterov, no decay).
  adamw = optax.adamw(lr, eps=1e-8, weight_decay=0.0, nesterov=True)
  for name in ("b1", "norm"):
    ref, _ = _run(adamw, {name: params[name]}, [{name: g[name]} for g in grads])
    chex.assert_trees_all_close(got[name], ref[name], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    dict(weight_decay=0.1, beta=0.9, nesterov=False),
    dict(
      weight_decay=0.1,
      weight_decay_mask={"w1": True, "b1": False, "w2": False, "norm": False},
    ),
    dict(adam_learning_rate=0.003, adam_b2=0.95, adam_weight_decay=0.01),
    dict(consistent_rms=0.2, ns_coeffs="dion", ns_steps=5),
    dict(preconditioning="aol", adaptive=True),
    dict(preconditioning="schatten", ns_steps=4, eps=1e-6),
    dict(
      muon_weight_dimension_numbers={
        "w1": DN(),
        "b1": None,
        "w2": DN(1, 0),
        "norm": None,
      }
    ),
  ],
)
def test_power_zero_reproduces_optax_muon(kwargs):
  params = _params()
  grads = _grads(params, 6)
  ref, _ = _run(optax.contrib.muon(0.05, **kwargs), params, grads)
  for opt in (
    htmuon_jax.htmuon(0.05, power=0.0, method="newton_schulz", **kwargs),
    htmuon_jax.muon(0.05, **kwargs),
  ):
    got, _ = _run(opt, params, grads)
    # Same operations in the same order: equal up to fp32 round-off.
    chex.assert_trees_all_close(got, ref, rtol=1e-6, atol=1e-6)


def test_conv_and_stacked_layers():
  rng = np.random.default_rng(4)
  params = {
    "conv": jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.float32),
    "stack": jnp.asarray(rng.standard_normal((3, 6, 5)), jnp.float32),
    "stack_norm": jnp.ones((3, 5)),
  }
  dims = {"conv": DN((0, 1, 2), 3), "stack": DN(1, 2), "stack_norm": None}
  grads = _grads(params, 3)
  opt = htmuon_jax.htmuon(
    0.01,
    method="svd",
    muon_weight_dimension_numbers=dims,
  )
  got, state = _run(opt, params, grads)
  chex.assert_trees_all_equal_shapes(got, params)
  # Reference for the stacked kernel: each slice its own matrix.
  w = np.asarray(params["stack"], np.float64)
  m = np.zeros_like(w)
  for t, g in enumerate(grads, 1):
    g = np.asarray(g["stack"], np.float64)
    m, n = nesterov_ref(m, g, 0.95, t)
    w = w - 0.01 * np.stack([spectral_power_ref(n[i], 0.125) for i in range(3)])
  np.testing.assert_allclose(got["stack"], w, rtol=1e-5, atol=1e-6)
  # The stacked norm went to AdamW: its optimizer state has Adam moments.
  leaves = jax.tree_util.tree_leaves_with_path(state)
  assert any("stack_norm" in jax.tree_util.keystr(p) for p, _ in leaves)


def test_inject_hyperparams_power_changes_without_recompiling():
  params = _params()
  g = _grads(params, 1)[0]
  opt = optax.inject_hyperparams(htmuon_jax.htmuon)(
    learning_rate=0.1, power=0.125, weight_decay=0.0, method="svd"
  )
  state = opt.init(params)
  traces = []

  @jax.jit
  def update(state):
    traces.append(None)
    return opt.update(g, state, params)[0]

  out_a = update(state)
  hp = dict(
    state.hyperparams,
    power=jnp.asarray(0.5, jnp.float32),
    learning_rate=jnp.asarray(0.2, jnp.float32),
  )
  out_b = update(state._replace(hyperparams=hp))
  assert len(traces) == 1
  # Same momentum (first step), different power and learning rate.
  # optax bias correction at t=1: beta * m_1 / (1 - beta^2) + (1 - beta) g / (1 - beta)
  n = np.asarray(
    0.95 * 0.05 * g["w1"] / (1 - 0.95**2) + 0.05 * g["w1"] / 0.05, np.float64
  )
  for out, p, lr in ((out_a, 0.125, 0.1), (out_b, 0.5, 0.2)):
    ref = -lr * np.sqrt(2.0) * spectral_power_ref(n, p)
    np.testing.assert_allclose(out["w1"], ref, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_nnx_style_state_pytree_of_variables():
  import flax
  from flax import nnx

  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(
    model, htmuon_jax.htmuon(0.01, method="svd"), wrt=nnx.Param
  )
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  before = model.kernel[...]
  opt.update(model, grads)
  assert not np.allclose(model.kernel[...], before)
  del flax


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(power=-1.0), "power"),
    (dict(beta=1.0), "beta"),
    (dict(method="magic"), "method"),
    (dict(power=0.1, method="newton_schulz"), "newton_schulz"),
    (dict(spectral_eps=2.0), "eps"),
    (
      dict(preconditioning="none", power=0.0, method="newton_schulz"),
      "preconditioning",
    ),
  ],
)
def test_invalid_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    opt = htmuon_jax.htmuon(0.1, **kwargs)
    params = _params()
    opt.update(params, opt.init(params), params)


def test_muon_fixes_power():
  with pytest.raises(TypeError, match="power"):
    htmuon_jax.muon(0.1, power=0.5)


REMOVED = {
  "rank": ("Stream(rank=", 2),
  "stream_qr": ("Stream(qr=", "cholesky"),
  "stream_side": ("Stream(side=", "fan_in"),
  "precision": ("Polynomial(precision=", "fast"),
  "interval_method": ("scale_by_htmuon(", "svd"),
  "interval_first": ("scale_by_htmuon(", True),
  "bias_correction": ("scale_by_htmuon(", False),
  "adam_nesterov": ("optax.adamw(", False),
}


@pytest.mark.parametrize("name", ["htmuon", "muon", "htnormuon", "htadamuon"])
@pytest.mark.parametrize("keyword", sorted(REMOVED))
def test_removed_keywords_name_their_new_form(name, keyword):
  new_form, value = REMOVED[keyword]
  with pytest.raises(TypeError, match=re.escape(new_form)):
    htmuon_jax.ALIASES[name](0.01, **{keyword: value})


@pytest.mark.parametrize("keyword", ["method", "spectral_eps", "interval"])
def test_muon_takes_optax_keywords_only(keyword):
  with pytest.raises(
    TypeError, match=re.escape(f"htmuon(power=0.0, {keyword}")
  ):
    htmuon_jax.muon(0.01, **{keyword: "svd"})


def test_muon_signature_is_optax_plus_distribute():
  ours = inspect.signature(htmuon_jax.muon).parameters
  theirs = inspect.signature(optax.contrib.muon).parameters
  assert list(ours) == [*theirs, "distribute"]
  for k, p in theirs.items():
    assert ours[k].default == p.default, k


def test_htmuon_signature_and_shared_keywords_agree():
  # One declaration (HTMuonKeywords) behind the aliases' shared keywords:
  # htmuon's written-out signature must match it name for name, default
  # for default, and htnormuon/htadamuon show it after their own keywords.
  fields = dataclasses.fields(htmuon_jax._alias.HTMuonKeywords)
  params = inspect.signature(htmuon_jax.htmuon).parameters
  assert list(params)[1:] == [f.name for f in fields]
  for f in fields:
    assert params[f.name].default == f.default, f.name
  assert len(params) <= 24
  for name, own in (
    ("htnormuon", ["beta2", "normuon_eps"]),
    ("htadamuon", ["beta2", "adamuon_eps", "rms"]),
  ):
    theirs = inspect.signature(htmuon_jax.ALIASES[name]).parameters
    assert list(theirs) == ["learning_rate", "power", *own] + [
      f.name for f in fields if f.name != "power"
    ]


@pytest.mark.parametrize("name", ["htmuon", "htnormuon", "htadamuon"])
def test_documented_interval_rule_is_the_behaviour(name):
  # Docstrings once said "the first included" while the code ran the HT
  # step on updates k, 2k, ...: each alias's docstring states the rule, and
  # update 1 of interval=2 is Muon's Newton-Schulz step, update 2 the HT one.
  doc = htmuon_jax.ALIASES[name].__doc__
  assert "`k, 2k, ...`" in " ".join(doc.split()), name
  assert "first included" not in doc
  make = htmuon_jax.ALIASES[name]
  params = {"w": jnp.zeros((6, 4))}
  rng = np.random.default_rng(7)
  grads = [{"w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)}]
  grads.append({"w": grads[0]["w"]})  # same gradient: equal momenta

  def updates(opt):
    state, outs = opt.init(params), []
    for g in grads:
      u, state = opt.update(g, state, params)
      outs.append(u["w"])
    return outs

  interval = updates(make(0.1, 0.5, method="svd", interval=2))
  muon_steps = updates(make(0.1, 0.0, method="newton_schulz"))
  ht_steps = updates(make(0.1, 0.5, method="svd"))
  chex.assert_trees_all_close(interval[0], muon_steps[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(interval[0], ht_steps[0], atol=1e-4)
  if name == "htmuon":  # stateless after the momentum: update 2 is HT's
    chex.assert_trees_all_close(interval[1], ht_steps[1], rtol=1e-5, atol=1e-6)
