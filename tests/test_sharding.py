"""Tests for htmuon_jax.sharding.

The multi-device cases live in `tests/sharding_cases.py` and run in a
subprocess with 8 forced CPU devices (the flag must be set before JAX is
imported, and the main suite's xdist workers have imported JAX with one
device). The tests here run in-process on one device.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import htmuon_jax
from htmuon_jax import sharding as sh
from htmuon_jax import testing
from tests.multidevice import run_cases_on_8_cpu_devices


@pytest.mark.multidevice
@pytest.mark.parametrize("part", [0, 1])
def test_sharding_cases_on_8_cpu_devices(part):
  # Two halves of the cases, so that xdist's two workers share them.
  run_cases_on_8_cpu_devices("sharding_cases.py", part=(part, 2))


def _mesh1():
  return jax.make_mesh((1,), ("d",))


@pytest.mark.parametrize("bad", [3, ("d", 1), (), object()])
def test_as_distribute_rejects(bad):
  with pytest.raises(ValueError, match="distribute"):
    sh.as_distribute(bad)


def test_as_distribute_forms():
  mesh = _mesh1()
  assert sh.as_distribute(None) is None
  assert sh.as_distribute(mesh) == sh.Distribute(mesh, None)
  assert sh.as_distribute("d") == sh.Distribute(None, ("d",))
  assert sh.as_distribute(["a", "b"]) == sh.Distribute(None, ("a", "b"))
  with pytest.raises(ValueError, match="not axes of the mesh"):
    sh.as_distribute(sh.Distribute(mesh, ("x",)))
  with pytest.raises(ValueError, match="distribute"):
    htmuon_jax.htmuon(0.1, distribute=42)


def test_axis_names_without_mesh_raise():
  opt = htmuon_jax.scale_by_spectral_power(0.5, distribute="d")
  with pytest.raises(ValueError, match="no mesh is set"):
    opt.update({"w": jnp.ones((4, 4))}, optax.EmptyState())


def _mixed_tree(key):
  """Wide, tall (its transpose) and stacked matrices, and a vector."""
  params = {
    "a": jax.random.normal(key, (8, 12)),
    "b": jax.random.normal(jax.random.fold_in(key, 1), (12, 8)),
    "c": jax.random.normal(jax.random.fold_in(key, 2), (3, 8, 12)),
    "n": jnp.ones(8),
  }
  dims = {
    "a": htmuon_jax.MuonDimensionNumbers(),
    "b": htmuon_jax.MuonDimensionNumbers(),
    "c": htmuon_jax.MuonDimensionNumbers(1, 2),
    "n": None,
  }
  return params, dims


def test_distributed_equals_default_on_one_device():
  """Grouping, transposes and padding change nothing numerically."""
  mesh = _mesh1()
  params, dims = _mixed_tree(jax.random.key(0))
  for power, method in ((0.125, "svd"), (0.0, "newton_schulz")):
    ref = htmuon_jax.scale_by_spectral_power(
      power, method=method, weight_dimension_numbers=dims
    )
    dist = htmuon_jax.scale_by_spectral_power(
      power, method=method, weight_dimension_numbers=dims, distribute=mesh
    )
    want = jax.jit(lambda g, o=ref: o.update(g, optax.EmptyState())[0])(params)
    got = jax.jit(lambda g, o=dist: o.update(g, optax.EmptyState())[0])(params)
    # Same fp32 computation on the same device, batched differently: a few
    # ulps from batching (LAPACK / matmul blocking).
    chex.assert_trees_all_close(got, want, atol=2e-6, rtol=0)
    np.testing.assert_array_equal(got["n"], params["n"])


@pytest.mark.parametrize("qr", ["qr", "cholesky"])
def test_distributed_stream_equals_default_on_one_device(qr):
  """Matrices and bases grouped by shape and rank; the basis carries over."""
  mesh = _mesh1()
  params, dims = _mixed_tree(jax.random.key(1))
  make = lambda **kw: htmuon_jax.scale_by_spectral_power(
    0.125,
    method=htmuon_jax.methods.Stream(rank=5, qr=qr),
    weight_dimension_numbers=dims,
    **kw,
  )
  ref, dist = make(), make(distribute=mesh)
  ref_state, dist_state = ref.init(params), dist.init(params)
  for i in range(3):
    grads = jax.tree.map(lambda p, i=i: p + 0.5 * i, params)
    want, ref_state = jax.jit(ref.update)(grads, ref_state)
    got, dist_state = jax.jit(dist.update)(grads, dist_state)
    # Batched differently: a few ulps (LAPACK / matmul blocking).
    chex.assert_trees_all_close(
      (got, dist_state), (want, ref_state), atol=2e-6, rtol=0
    )
    np.testing.assert_array_equal(got["n"], grads["n"])


@pytest.mark.parametrize("method", ["auto", "stream"])
def test_zero_gradients_give_zero_distributed_updates(method):
  mesh = _mesh1()
  opt = htmuon_jax.htmuon(0.1, method=method, distribute=mesh)
  params = {"w": jnp.ones((8, 4)), "v": jnp.ones((4, 8)), "b": jnp.ones(4)}
  state = opt.init(params)
  updates, _ = jax.jit(opt.update)(
    jax.tree.map(jnp.zeros_like, params), state, params
  )
  for u in jax.tree.leaves(updates):
    assert not np.any(np.isnan(u))
    np.testing.assert_array_equal(u, 0.0)


def test_state_shardings_one_device():
  mesh = _mesh1()
  params = {"w": jnp.ones((4, 6)), "b": jnp.ones(6)}
  shard = {
    "w": NamedSharding(mesh, P("d", None)),
    "b": NamedSharding(mesh, P()),
  }
  opt = htmuon_jax.htmuon(0.1)
  got = sh.state_shardings(opt, jax.device_put(params, shard))
  assert jax.tree.structure(got) == jax.tree.structure(
    jax.eval_shape(opt.init, params)
  )
  for path, s in jax.tree.leaves_with_path(got):
    if jax.tree_util.keystr(path).endswith("['w']"):
      assert s.spec == P("d", None), path
    else:
      assert s.spec == P(), path
  with pytest.raises(ValueError, match="param_shardings"):
    sh.state_shardings(opt, params, jax.tree.map(lambda _: None, params))


_MESH_4X2 = jax.sharding.AbstractMesh((4, 2), ("fsdp", "tp"))


@pytest.mark.parametrize(
  "shape,param_spec,want",
  [
    # A stack of per-matrix state: along the stack, over both axes.
    ((8, 16, 16), P(None, "fsdp", "tp"), P(("fsdp", "tp"))),
    # One matrix (batch 1): along the rows.
    ((1, 32, 32), P("fsdp", "tp"), P(None, ("fsdp", "tp"))),
    # No axis takes all 8 devices: each mesh axis on the first axis it
    # divides; one that divides none is left out (replicated over it).
    ((1, 12, 5), P("fsdp", "tp"), P(None, "fsdp")),
    ((3, 6, 5), P("fsdp", "tp"), P(None, "tp")),
    ((3, 5, 7), P("fsdp", "tp"), P()),
    # Only the axes that split the parameter count.
    ((8, 8), P(None, "tp"), P("tp")),
    ((8, 8), P(), P()),
    ((), P("fsdp"), P()),
  ],
)
def test_spread_spec_even_shards(shape, param_spec, want):
  got = sh.spread_spec(shape, NamedSharding(_MESH_4X2, param_spec))
  assert got == want, got


def test_state_shardings_split_per_matrix_state_like_params():
  """Uneven sizes on a 4x2 (abstract) mesh: the streaming basis of a stack
  is split along the stack even where its shape equals the parameter's, and
  every spec divides its leaf evenly."""
  shard = {
    "s": NamedSharding(_MESH_4X2, P(None, "fsdp", None)),
    "w": NamedSharding(_MESH_4X2, P("fsdp", "tp")),
    "u": NamedSharding(_MESH_4X2, P("tp", None)),
  }
  params = {
    "s": jax.ShapeDtypeStruct((4, 12, 12), jnp.float32),
    "w": jax.ShapeDtypeStruct((12, 20), jnp.float32),
    "u": jax.ShapeDtypeStruct((6, 10), jnp.float32),
  }
  mdn = htmuon_jax.MuonDimensionNumbers
  opt = htmuon_jax.scale_by_htmuon(
    0.125,
    method="stream",
    weight_dimension_numbers={"s": mdn(1, 2), "w": mdn(), "u": mdn()},
  )
  got = sh.state_shardings(opt, params, shard)
  assert got.mu == shard  # Momenta mirror their parameters.
  basis = got.spectral.basis
  assert basis["s"].spec == P("fsdp"), basis["s"]  # 4 matrices over 4
  assert basis["w"].spec == P(None, "fsdp", "tp"), basis["w"]  # (1, 12, 12)
  assert basis["u"].spec == P(None, "tp"), basis["u"]  # (1, 6, 6)
  assert got.count.spec == P()


HLO = """\
HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), replica_groups={}, to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ar)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %ag = (f32[8]{0}, /*index=1*/f32[8]{0}) all-to-all(%a, %a), dimensions={0}
  %ags = f32[16]{0} all-gather-start(%a), dimensions={0}
  %agd = f32[16]{0} all-gather-done(%ags)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_count_collectives_text():
  counts = testing.count_collectives(HLO)
  assert counts["total"] == {
    "all-reduce": 1,
    "all-gather": 1,
    "all-to-all": 1,
    "reduce-scatter": 0,
    "collective-permute": 0,
  }
  assert counts["in_loop"]["all-reduce"] == 1
  assert sum(counts["in_loop"].values()) == 1
