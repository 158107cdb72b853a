"""Tests for `interval=k`: the HT step every k-th step, Muon's otherwise."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib._muon import orthogonalize_via_newton_schulz as optax_ns

import htmuon_jax
from tests.reference import nesterov_ref, rel_err, spectral_power_ref

# optax's Muon orthogonalization (the independent reference), jitted once.
orthogonalize_via_newton_schulz = jax.jit(optax_ns)


def interval_ref(
  grads_seq, *, power, k, beta=0.95, muon=None, first=False, corrected=False
):
  """Updates of the interval mode in numpy float64 (one matrix).

  Momentum M <- b M + (1-b) G, Nesterov N = b M + (1-b) G (the authors'
  rule, no bias correction; `corrected=True`: optax's bias-corrected
  Nesterov, the aliases'); update t = 1, 2, ... uses U S^p V^T if
  t % k == 0 (the authors' rule; `first=True`: if (t - 1) % k == 0), else
  Muon's U V^T (`muon(N)`, default the exact polar factor).
  """
  muon = muon or (lambda n: spectral_power_ref(n, 0.0))
  m = np.zeros_like(grads_seq[0], dtype=np.float64)
  outs = []
  for t, g in enumerate(grads_seq, start=1):
    g = np.asarray(g, np.float64)
    if corrected:
      m, n = nesterov_ref(m, g, beta, t)
    else:
      m = beta * m + (1 - beta) * g
      n = beta * m + (1 - beta) * g
    ht = (t - 1) % k == 0 if first else t % k == 0
    outs.append(spectral_power_ref(n, power) if ht else muon(n))
  return outs


def grads(seed, shape, steps):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]


@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("shape", [(7, 4), (4, 6)])
def test_matches_numpy_rule_over_steps(k, shape, first):
  gs = grads(0, shape, 7)
  tx = htmuon_jax.scale_by_htmuon(
    0.25,
    method="svd",
    bias_correction=False,
    interval=k,
    interval_method="svd",
    interval_first=first,
  )
  state = tx.init({"w": gs[0]})
  step = jax.jit(tx.update)
  for g, ref in zip(gs, interval_ref(gs, power=0.25, k=k, first=first)):
    out, state = step({"w": jnp.asarray(g)}, state)
    assert rel_err(out["w"], ref) < 2e-6  # fp32 SVD vs float64


def ns(n):  # optax's Muon orthogonalization, the independent reference
  return np.asarray(
    orthogonalize_via_newton_schulz(
      jnp.asarray(n, jnp.float32), jnp.asarray((3.4445, -4.7750, 2.0315))
    )
  )


def test_default_muon_steps_use_newton_schulz():
  gs = grads(1, (6, 4), 5)
  tx = htmuon_jax.scale_by_htmuon(
    0.125, method="svd", bias_correction=False, interval=2
  )
  state = tx.init({"w": gs[0]})
  step = jax.jit(tx.update)
  for g, ref in zip(gs, interval_ref(gs, power=0.125, k=2, muon=ns)):
    out, state = step({"w": jnp.asarray(g)}, state)
    assert rel_err(out["w"], ref) < 2e-6  # fp32 (NS in fp32 as optax)


def test_traced_once_without_python_counter():
  gs = grads(2, (5, 4), 6)
  tx = htmuon_jax.scale_by_htmuon(0.125, method="svd", interval=3)
  traces = []

  def update(g, s):
    traces.append(1)
    return tx.update(g, s)

  step = jax.jit(update)
  state = tx.init({"w": gs[0]})
  outs = []
  for g in gs:
    out, state = step({"w": jnp.asarray(g)}, state)
    outs.append(out["w"])
  assert len(traces) == 1
  assert int(state.count) == 6


def test_interval_can_be_injected_and_changed():
  gs = grads(3, (6, 3), 4)
  tx = optax.inject_hyperparams(htmuon_jax.scale_by_htmuon)(
    power=0.5,
    method="svd",
    bias_correction=False,
    interval=2,
    interval_method="svd",
  )
  state = tx.init({"w": gs[0]})
  step = jax.jit(tx.update)
  refs_k2 = interval_ref(gs, power=0.5, k=2)
  refs_k3 = interval_ref(gs, power=0.5, k=3)
  for t, g in enumerate(gs):
    if t == 2:
      state.hyperparams["interval"] = jnp.asarray(3)
    out, state = step({"w": jnp.asarray(g)}, state)
    ref = refs_k2[t] if t < 2 else refs_k3[t]
    assert rel_err(out["w"], ref) < 2e-6  # fp32 SVD


def test_stream_basis_advances_only_on_ht_steps():
  gs = grads(4, (6, 4), 3)
  tx = htmuon_jax.scale_by_htmuon(0.125, method="stream", interval=2)
  state = tx.init({"w": gs[0]})
  step = jax.jit(tx.update)
  _, s1 = step({"w": jnp.asarray(gs[0])}, state)  # Muon step
  _, s2 = step({"w": jnp.asarray(gs[1])}, s1)  # HT step
  chex.assert_trees_all_equal(s1.spectral, state.spectral)
  assert not np.allclose(s2.spectral.basis["w"], s1.spectral.basis["w"])


def test_htmuon_alias_interval():
  # The alias: HT steps on updates 2, 4, ..., Newton-Schulz on the others,
  # optax's bias-corrected momentum.
  gs = grads(5, (5, 8), 4)
  lr = 0.1
  opt = htmuon_jax.htmuon(lr, 0.125, method="svd", interval=2)
  params = {"w": jnp.zeros((5, 8))}
  state = opt.init(params)
  step = jax.jit(opt.update)
  refs = interval_ref(gs, power=0.125, k=2, muon=ns, corrected=True)
  for g, ref in zip(gs, refs):
    up, state = step({"w": jnp.asarray(g)}, state, params)
    # shape factor sqrt(max(1, 8 / 5)); fp32 SVD vs float64.
    assert rel_err(-up["w"] / lr, np.sqrt(8 / 5) * ref) < 2e-6


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"interval": 0}, "interval"),
    ({"interval": 2.5}, "interval"),
    ({"interval": 2, "interval_method": "stream"}, "interval_method"),
    ({"interval": 2, "interval_method": "qr"}, "interval_method"),
  ],
)
def test_bad_arguments_raise(kwargs, name):
  with pytest.raises(ValueError, match=name):
    htmuon_jax.scale_by_htmuon(0.125, **kwargs)
