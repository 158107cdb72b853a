"""The grouping plan: grouped steps equal per-leaf ones; one program."""

from __future__ import annotations

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import htmuon_jax
from tests import helpers
from htmuon_jax import _grouping as grouping


def _tree(layers: int, seed: int = 0) -> dict:
  return jax.tree.map(jnp.asarray, helpers.layered_tree(layers, seed))


# Each takes the optimizer's execution options (`distribute=`).
_OPTIMIZERS = {
  "htmuon_polynomial": lambda e: htmuon_jax.htmuon(
    0.02,
    method=htmuon_jax.methods.Polynomial(precision="accurate"),
    distribute=e,
  ),
  "htmuon_svd": lambda e: htmuon_jax.htmuon(0.02, method="svd", distribute=e),
  "htmuon_eigh": lambda e: htmuon_jax.htmuon(0.02, method="eigh", distribute=e),
  "htadamuon": lambda e: htmuon_jax.htadamuon(0.02, distribute=e),
  "htmuon_stream": lambda e: htmuon_jax.htmuon(
    0.02, method="stream", distribute=e
  ),
  "muon": lambda e: htmuon_jax.muon(0.02, distribute=e),
  "htnormuon": lambda e: htmuon_jax.htnormuon(0.02, distribute=e),
  "rmnp": lambda e: htmuon_jax.rmnp(0.02, distribute=e),
}
PER_LEAF = htmuon_jax.Execution(grouping="off", memory_budget=None)


def _two_steps(opt, params, ulp: bool = False):
  state = opt.init(params)
  out = []
  for seed in (1, 2):
    grads = _tree(3, seed)
    if ulp:
      grads = jax.tree.map(lambda g: jnp.nextafter(g, jnp.inf), grads)
    updates, state = jax.jit(opt.update)(grads, state, params)
    out.append(updates)
  return out, state


# Each group whole with transposes joined; a budget of one byte (a loop over
# single matrices) with equal shapes only.
@pytest.mark.parametrize(
  "budget,grouping", [(None, "transposes"), (1, "shapes")]
)
@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_grouped_equals_per_leaf(name, budget, grouping):
  # Grouped against one program per leaf ("off"): equal to fp32 round-off,
  # stateful methods included.
  params = _tree(3)
  leaf, leaf_state = _two_steps(_OPTIMIZERS[name](PER_LEAF), params)
  execution = htmuon_jax.Execution(grouping=grouping, memory_budget=budget)
  grouped, grouped_state = _two_steps(_OPTIMIZERS[name](execution), params)
  if name not in ("htmuon_stream", "htmuon_eigh"):
    chex.assert_trees_all_close(grouped, leaf, rtol=2e-5, atol=2e-6)
    chex.assert_trees_all_close(grouped_state, leaf_state, rtol=2e-5, atol=2e-6)
    return
  # A grouped chain's elementwise steps may round an ulp apart from the
  # per-leaf ones (XLA fuses a group's stack differently), and two methods
  # amplify that: the streaming basis (its QR and small eigenproblem are
  # sensitive near repeated values) and eigh (the Gram matrix squares the
  # condition number). The bound is what one ulp of input change does to
  # the same per-leaf run.
  moved, _ = _two_steps(_OPTIMIZERS[name](PER_LEAF), params, ulp=True)
  diff = lambda a, b: max(
    float(jnp.max(jnp.abs(x - y)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
  assert diff(grouped, leaf) <= 4 * diff(leaf, moved) + 1e-6


def test_stacked_tree_grouped_equals_per_leaf():
  # A scan-stacked tree (layers on a leading axis) joins the unstacked
  # leaves of its shape in one group.
  params = _tree(2)
  stacked = {
    "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *params.values())
  }
  tree = {**params, **stacked}
  mdn = htmuon_jax.MuonDimensionNumbers
  layer = {"attn": mdn(), "up": mdn(), "down": mdn(), "norm": None}
  stack = {k: v and mdn((1,), (2,)) for k, v in layer.items()}
  wrap = lambda d: {k: {"kernel" if v else "scale": v} for k, v in d.items()}
  dims = {**{k: wrap(layer) for k in params}, "blocks": wrap(stack)}
  grads = jax.tree.map(lambda x: x * 0.5 + 0.1, tree)
  out = {}
  for mode in ("off", "transposes"):
    opt = htmuon_jax.htmuon(
      0.02,
      method=htmuon_jax.methods.Polynomial(precision="accurate"),
      muon_weight_dimension_numbers=dims,
      distribute=htmuon_jax.Execution(grouping=mode),
    )
    out[mode], _ = jax.jit(opt.update)(grads, opt.init(tree), tree)
  chex.assert_trees_all_close(
    out["transposes"], out["off"], rtol=2e-5, atol=2e-6
  )


def test_leaf_grouping_modes():
  # CPU here: "auto" runs each leaf alone (grouping is for accelerators);
  # explicit modes hold; bad modes and budgets are named at construction.
  assert jax.default_backend() == "cpu"
  assert grouping.resolved_grouping("auto") == "off"
  assert grouping.resolved_grouping("shapes") == "shapes"
  with pytest.raises(ValueError, match="grouping"):
    htmuon_jax.Execution(grouping="always")
  with pytest.raises(ValueError, match="grouping"):
    htmuon_jax.htmuon(0.1, distribute=htmuon_jax.Execution(grouping="x"))


def test_no_module_state_steers_the_program():
  # Two optimizers with different execution options in one program: each
  # keeps its own (no process-global switch read while tracing).
  params = _tree(3)
  grads = _tree(3, 4)
  grouped = htmuon_jax.htmuon(
    0.02, method="svd", distribute=htmuon_jax.Execution(grouping="shapes")
  )
  alone = htmuon_jax.htmuon(0.02, method="svd", distribute=PER_LEAF)

  def both(g):
    a, _ = grouped.update(g, grouped.init(params), params)
    b, _ = alone.update(g, alone.init(params), params)
    return a, b

  text = jax.jit(both).lower(grads).as_text()
  # grouped: one concatenate per group of the 3 layers' equal leaves.
  assert "stablehlo.concatenate" in text
  a, b = jax.jit(both)(grads)
  chex.assert_trees_all_close(a, b, rtol=2e-5, atol=2e-6)
  assert not hasattr(grouping, "leaf_grouping")
  assert not hasattr(grouping, "set_memory_budget")


def test_grouped_equals_one_matrix_at_a_time():
  # The grouped executor against the spectral power of each matrix alone.
  params = _tree(3)
  grads = _tree(3, 5)
  opt = htmuon_jax.scale_by_spectral_power(
    method="svd",
    power=0.125,
    distribute=htmuon_jax.Execution(grouping="transposes"),
  )
  updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
  for layer in grads:
    for name in ("attn", "up", "down"):
      g = np.asarray(grads[layer][name]["kernel"], np.float64)
      u, s, vt = np.linalg.svd(g, full_matrices=False)
      expected = (u * s**0.125) @ vt
      got = np.asarray(updates[layer][name]["kernel"])
      scale = np.abs(expected).max()
      np.testing.assert_allclose(got / scale, expected / scale, atol=1e-5)


def _dot_count(layers: int) -> int:
  params = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _tree(layers)
  )
  # The grouping "auto" picks on one accelerator device.
  opt = htmuon_jax.htmuon(
    0.02,
    method=htmuon_jax.methods.Polynomial(precision="fast"),
    distribute=htmuon_jax.Execution(grouping="transposes"),
  )
  state = jax.eval_shape(opt.init, params)
  text = jax.jit(opt.update).lower(params, state, params).as_text()
  return len(re.findall(r"stablehlo\.dot_general", text))


def test_program_size_does_not_grow_with_layers():
  # Structural: the 6-layer tree's program has the 2-layer tree's dots (one
  # copy of the step per shape group), not three times as many. A per-leaf
  # program would add >= 9 dots per matrix leaf (3 leaves per layer).
  two, six = _dot_count(2), _dot_count(6)
  assert six - two < 9, (two, six)


@pytest.mark.parametrize(
  "n, entry, budget, expected",
  [(24, 10, None, 24), (24, 10, 240, 24), (24, 10, 100, 8), (7, 10, 30, 1)],
)
def test_chunk_size(n, entry, budget, expected):
  assert grouping.chunk_size(n, entry, budget) == expected


def test_bad_budget_is_rejected():
  with pytest.raises(ValueError, match="memory_budget"):
    htmuon_jax.Execution(memory_budget=0)


def test_stated_shardings_are_normalized_and_checked():
  # A tree of specs or shardings becomes hashable (path, spec) pairs, kept
  # by dataclasses.replace; anything else is named at construction.
  mesh = jax.make_mesh((1,), ("fsdp",))
  P = jax.sharding.PartitionSpec
  tree = {"a": {"kernel": P("fsdp", None)}, "b": NamedSharding(mesh, P())}
  e = htmuon_jax.Execution(grouping="shapes", shardings=tree)
  assert e.shardings == (("['a']['kernel']", P("fsdp", None)), ("['b']", P()))
  assert dataclasses.replace(e, memory_budget=None).shardings == e.shardings
  hash(e)
  for bad in ({"a": "fsdp"}, {}, 3):
    with pytest.raises(ValueError, match="shardings"):
      htmuon_jax.Execution(shardings=bad)
  # A parameter without a stated sharding is named at the first update.
  opt = htmuon_jax.htmuon(0.1, distribute=e)
  params = {"a": {"kernel": jnp.ones((4, 4))}, "c": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match=re.escape("shardings: no sharding")):
    opt.update(params, opt.init(params), params)


def test_large_stack_runs_alone_small_ones_join():
  # A stacked leaf needing more than one chunk is not copied into a group
  # (its own lax.map); single matrices of its shape still join each other.
  stack = jnp.ones((4, 16, 16))
  singles = [jnp.full((1, 16, 16), 2.0), jnp.full((1, 16, 16), 3.0)]
  entry = 10 * 16 * 16 * 4  # the plan's working-set estimate of one entry
  fn = lambda x: x * 2.0
  execution = htmuon_jax.Execution(
    grouping="transposes", memory_budget=2 * entry
  )

  def run(*xs):
    return grouping.grouped_map(fn, xs, execution)

  text = jax.jit(run).lower(stack, *singles).as_text()
  concats = re.findall(r"stablehlo\.concatenate.*", text)
  assert len(concats) == 1, concats
  assert "1x16x16" in concats[0] and "4x16x16" not in concats[0], concats
  out = run(stack, *singles)
  chex.assert_trees_all_close(out, [fn(x) for x in (stack, *singles)])


def _shapes(*shapes):
  return [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]


def test_plan_groups_equal_shapes_and_joins_transposes_once():
  # One decision for every level: equal shapes share a group, a tall matrix
  # joins its wide transpose only where the grouping allows it, and a
  # stack over one chunk stays alone.
  items = _shapes((1, 4, 8), (2, 4, 8), (1, 8, 4), (3, 4, 4))
  ex = htmuon_jax.Execution(grouping="transposes", memory_budget=None)
  p = grouping.plan(items, ex, transposes=True)
  assert p.placement == grouping.GROUPED
  assert p.groups == ((0, 1, 2), (3,))
  assert p.flipped == (False, False, True, False)
  shapes = htmuon_jax.Execution(grouping="shapes", memory_budget=None)
  p = grouping.plan(items, shapes, transposes=True)
  assert p.groups == ((0, 1), (2,), (3,)) and not any(p.flipped)
  stacks = _shapes((1, 4, 8), (3, 4, 8), (1, 4, 8))
  entry = grouping.entry_bytes(stacks[0])
  small = htmuon_jax.Execution(grouping="shapes", memory_budget=2 * entry)
  assert grouping.plan(stacks, small).groups == ((0, 2), (1,))
  off = htmuon_jax.Execution(grouping="off")
  p = grouping.plan(items, off, transposes=True)
  assert p.placement == grouping.LEAF and p.groups == ((0,), (1,), (2,), (3,))


def test_plan_on_a_mesh_groups_every_equal_item():
  # Distributed: no item stays alone, transposes always join, and a step
  # said to be transpose-equivariant must take (B, m, n) arrays.
  ex = htmuon_jax.Execution(distribute="x", grouping="off", memory_budget=1)
  items = _shapes((8, 4, 8), (1, 8, 4))
  p = grouping.plan(items, ex, transposes=True)
  assert p.placement == grouping.MESH and p.groups == ((0, 1),)
  with pytest.raises(ValueError, match="transposes"):
    grouping.plan([(items[0], items[0])], ex, transposes=True)


def test_plan_at_the_chain_level_keys_layout_and_decay():
  # Leaves stack on a new axis: equal full shapes only, split by layout
  # (the same axes written two ways are one layout) and by decay flag;
  # `distribute` does not apply to the chain.
  mdn = htmuon_jax.MuonDimensionNumbers
  leaves = _shapes((4, 4), (4, 4), (4, 4), (4, 4), (2, 4, 4), (4,))
  dims = [mdn(0, 1), mdn((-2,), (-1,)), mdn(1, 0), mdn(0, 1), None, None]
  flags = [True, True, True, False, True, True]
  ex = htmuon_jax.Execution(distribute="x", grouping="shapes")
  p = grouping.plan(leaves, ex, dims=dims, flags=flags)
  assert p.placement == grouping.GROUPED
  assert p.groups == ((0, 1), (2,), (3,), (4,), (5,))


def test_plan_with_explicit_shardings_groups_equal_ones_untransposed():
  # Shardings visible in the types (explicit mesh axes): items group only
  # with equal shardings, and a transpose (another sharding) joins no one.
  items = _shapes((1, 4, 8), (1, 4, 8), (1, 8, 4), (1, 4, 8))
  ex = htmuon_jax.Execution(grouping="transposes", memory_budget=None)
  p = grouping.plan(items, ex, transposes=True, shardings=["a", "b", "a", "a"])
  assert p.groups == ((0, 3), (1,), (2,)) and not any(p.flipped)
