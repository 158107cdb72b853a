"""A chain traced once per shape group: same numbers, per-leaf state, a
program that does not grow with the number of layers."""

from __future__ import annotations

import re
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import htmuon_jax
from tests import helpers


def _tree(layers: int, seed: int = 0) -> dict:
  return jax.tree.map(jnp.asarray, helpers.layered_tree(layers, seed))


# make(execution) builds an optimizer with the given `distribute=` value.
Make = Callable[[htmuon_jax.Execution], optax.GradientTransformation]


def _run(make: Make, mode: str, layers: int = 3):
  opt = make(htmuon_jax.Execution(grouping=mode))
  params = _tree(layers)
  state = opt.init(params)
  out = []
  step = jax.jit(opt.update)
  for seed in (1, 2):
    updates, state = step(_tree(layers, seed), state, params)
    out.append(updates)
  return out, state


def _assert_same_run(
  make: Make, rtol: float = 2e-5, atol: float = 2e-6
) -> None:
  # Grouped elementwise steps may round an ulp apart (XLA fuses a stack
  # differently); polynomial and Newton-Schulz steps keep that at fp32
  # round-off.
  (leaf, leaf_state), (grouped, grouped_state) = (
    _run(make, mode) for mode in ("off", "shapes")
  )
  chex.assert_trees_all_close(grouped, leaf, rtol=rtol, atol=atol)
  chex.assert_trees_all_close(grouped_state, leaf_state, rtol=rtol, atol=atol)


def _ops(make: Make, layers: int, mode: str):
  opt = make(htmuon_jax.Execution(grouping=mode))
  params = _tree(layers)
  state = opt.init(params)
  text = jax.jit(opt.update).lower(params, state, params).as_text()
  names = re.findall(r"stablehlo\.([a-z_]+)", text)
  return len(text.splitlines()), {n: names.count(n) for n in set(names)}


_ELEMENTWISE = ("multiply", "add", "divide", "subtract", "sqrt", "select")


@pytest.mark.parametrize(
  "make",
  [
    lambda e: htmuon_jax.htmuon(
      0.02, method="polynomial", weight_decay=0.1, distribute=e
    ),
    lambda e: htmuon_jax.htnormuon(0.02, method="polynomial", distribute=e),
  ],
  ids=["htmuon", "htnormuon"],
)
def test_program_does_not_grow_with_layers(make):
  # Grouped, the chain's elementwise ops are written once per group: a
  # 6-layer tree has as many as a 2-layer one, and its program is longer
  # only by the slices that hand each leaf its result (an update and a
  # momentum per matrix; an update and two moments per AdamW leaf: 11 a
  # layer) and the signature. One program per leaf grows by the chain.
  lines2, ops2 = _ops(make, 2, "shapes")
  lines6, ops6 = _ops(make, 6, "shapes")
  for op in _ELEMENTWISE:
    assert ops6.get(op, 0) == ops2.get(op, 0), op
  assert lines6 - lines2 <= 4 * 16, (lines2, lines6)
  _, off2 = _ops(make, 2, "off")
  _, off6 = _ops(make, 6, "off")
  assert off6["multiply"] > off2["multiply"] + 4 * 8


def test_state_keeps_the_per_leaf_layout():
  # Checkpoints and state shardings see the state that `init` made.
  make = lambda e: htmuon_jax.htmuon(0.02, method="polynomial", distribute=e)
  opt = make(htmuon_jax.Execution())
  _, state = _run(make, "shapes")
  chex.assert_trees_all_equal_shapes_and_dtypes(state, opt.init(_tree(3)))
  assert jax.tree.structure(state) == jax.tree.structure(opt.init(_tree(3)))


@pytest.mark.parametrize(
  "mask",
  [
    lambda p: {
      k: jax.tree.map(lambda _, k=k: k == "layer1", v) for k, v in p.items()
    },
    "tree",
  ],
  ids=["callable", "tree"],
)
def test_leaves_of_one_shape_with_other_decay_flags(mask):
  # Equal shapes, some decayed and some not: the mask splits the group.
  params = _tree(3)
  if mask == "tree":
    mask = jax.tree.map(lambda x: x.shape == (16, 16), params)
    mask["layer0"]["attn"]["kernel"] = False
  _assert_same_run(
    lambda e: htmuon_jax.htmuon(
      0.02,
      method="polynomial",
      weight_decay=0.5,
      weight_decay_mask=mask,
      distribute=e,
    )
  )


def test_leaves_of_one_shape_in_other_layouts():
  # A (16, 16) leaf read (in, out) and one read (out, in) are different
  # matrices (transposed spectra, other fan-in): never one group.
  mdn = htmuon_jax.MuonDimensionNumbers
  dims = jax.tree.map(lambda x: mdn() if x.ndim == 2 else None, _tree(3))
  dims["layer1"]["attn"]["kernel"] = mdn(reduction_axis=1, output_axis=0)
  _assert_same_run(
    lambda e: htmuon_jax.muon(
      0.02,
      consistent_rms=0.2,
      muon_weight_dimension_numbers=dims,
      distribute=e,
    )
  )


def test_injected_hyperparameters():
  _assert_same_run(
    lambda e: optax.inject_hyperparams(
      htmuon_jax.htmuon, static_args=("power", "eps", "spectral_eps")
    )(
      learning_rate=0.02,
      power=0.25,
      method="polynomial",
      weight_decay=0.1,
      distribute=e,
    )
  )


def test_large_stacks_are_not_copied_into_a_group():
  # Two scan-stacked leaves larger than a chunk each run alone (joining
  # them would copy them): no concatenate in the program.
  rng = np.random.default_rng(0)
  params = {
    n: {"kernel": jnp.asarray(rng.standard_normal((4, 16, 16)), jnp.float32)}
    for n in ("q", "o")
  }
  mdn = htmuon_jax.MuonDimensionNumbers
  dims = jax.tree.map(lambda _: mdn((1,), (2,)), params)
  for budget, joined in ((1, 0), (None, 1)):
    # A new optimizer for each: jit caches the trace of one `update`.
    opt = htmuon_jax.htmuon(
      0.02,
      method="polynomial",
      muon_weight_dimension_numbers=dims,
      distribute=htmuon_jax.Execution(grouping="shapes", memory_budget=budget),
    )
    state = opt.init(params)
    text = jax.jit(opt.update).lower(params, state, params).as_text()
    assert (text.count("stablehlo.concatenate") > 0) == bool(joined), budget


def test_equinox_model_with_none_leaves():
  # An `eqx.filter`ed MLP: `None` in place of its activation functions,
  # (out, in) weights of two equal hidden layers and equal biases grouped.
  import equinox as eqx

  mlp = eqx.nn.MLP(8, 4, 16, 3, key=jax.random.key(0))
  params = eqx.filter(mlp, eqx.is_array)
  grads = [
    jax.tree.map(
      lambda x, k=k: jax.random.normal(jax.random.key(k), x.shape), params
    )
    for k in (1, 2)
  ]
  out = {}
  for mode in ("off", "shapes"):
    opt = htmuon_jax.htmuon(
      0.02,
      method="polynomial",
      weight_decay=0.1,
      distribute=htmuon_jax.Execution(grouping=mode),
    )
    state = opt.init(params)
    step = jax.jit(opt.update)
    text = step.lower(grads[0], state, params).as_text()
    for g in grads:
      updates, state = step(g, state, params)
    out[mode] = (updates, state)
    # Grouped, the equal leaves are stacked; per leaf, nothing is joined.
    assert ("stablehlo.concatenate" in text) == (mode == "shapes"), mode
  chex.assert_trees_all_close(out["shapes"], out["off"], rtol=2e-5, atol=2e-6)
