"""Orbax round trips of every optimizer state type across a change of mesh.

Not collected by the main suite: `tests/test_checkpoint_reshard.py` runs it
in a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=8`.
Each case trains two sharded steps on a 4x2 mesh, saves params and optimizer
state with orbax, restores them onto an 8x1 mesh with the shardings that
`htmuon_jax.sharding.state_shardings` gives there, and checks that nothing
is lost: every leaf comes back bit-identical with the target sharding, and
the next step from the restored state equals the next step taken on the
original mesh.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import htmuon_jax
from htmuon_jax import sharding as sh

if jax.device_count() != 8:
  pytest.skip(
    "needs XLA_FLAGS=--xla_force_host_platform_device_count=8",
    allow_module_level=True,
  )

AXES = ("fsdp", "tp")
SHAPES = {"w1": (16, 32), "w2": (32, 16), "b": (32,)}
SPECS = {"w1": P("fsdp", "tp"), "w2": P("fsdp", None), "b": P("fsdp")}


def _configs():
  configs = {
    "htmuon-svd": lambda: htmuon_jax.htmuon(
      0.01, method="svd", weight_decay=0.1
    ),
    "htmuon-stream": lambda: htmuon_jax.htmuon(0.01, method="stream"),
    "htmuon-interval": lambda: htmuon_jax.htmuon(
      0.01, method="svd", interval=2
    ),
    "muon": lambda: htmuon_jax.muon(0.01),
    "injected": lambda: optax.inject_hyperparams(htmuon_jax.htmuon)(
      learning_rate=0.01, power=0.25, method="svd"
    ),
    "apply_if_finite": lambda: optax.apply_if_finite(
      htmuon_jax.htmuon(0.01, method="svd"), 3
    ),
  }
  for name in ("htnormuon", "htadamuon", "rmnp"):
    if hasattr(htmuon_jax, name):
      configs[name] = lambda n=name: getattr(htmuon_jax, n)(0.01)
  return configs


CONFIGS = _configs()


def _tree(seed):
  keys = jax.random.split(jax.random.key(seed), len(SHAPES))
  return {
    n: jax.random.normal(k, s, jnp.float32)
    for k, (n, s) in zip(keys, SHAPES.items())
  }


def _mesh(shape):
  return jax.make_mesh(shape, AXES)


def _place(tree, mesh):
  return jax.device_put(
    tree, {k: NamedSharding(mesh, s) for k, s in SPECS.items()}
  )


def _step(opt):
  @jax.jit
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_on_4x2_restore_on_8x1(name, tmp_path):
  opt = CONFIGS[name]()
  step = _step(opt)
  mesh_a, mesh_b = _mesh((4, 2)), _mesh((8, 1))

  params = _place(_tree(0), mesh_a)
  state = jax.device_put(opt.init(params), sh.state_shardings(opt, params))
  for seed in (1, 2):
    params, state = step(params, state, _place(_tree(seed), mesh_a))

  checkpointer = ocp.StandardCheckpointer()
  path = tmp_path / "ckpt"
  checkpointer.save(path, {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()

  # Target layout on the new mesh: params by SPECS, state by state_shardings.
  target_params = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    params,
    {k: NamedSharding(mesh_b, s) for k, s in SPECS.items()},
  )
  state_targets = sh.state_shardings(opt, target_params)
  target_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    state,
    state_targets,
  )
  restored = checkpointer.restore(
    path, {"params": target_params, "opt_state": target_state}
  )

  # Nothing lost: same structure, bit-identical values, new shardings.
  chex.assert_trees_all_equal_structs(restored["opt_state"], state)
  chex.assert_trees_all_equal(restored, {"params": params, "opt_state": state})
  for leaf, target in zip(
    jax.tree.leaves(restored["opt_state"]), jax.tree.leaves(state_targets)
  ):
    assert leaf.sharding.is_equivalent_to(target, leaf.ndim)
  assert restored["params"]["w1"].sharding.mesh.devices.shape == (8, 1)

  # Training continues identically (up to the new mesh's reduction order).
  grads = _tree(3)
  p_a, s_a = step(params, state, _place(grads, mesh_a))
  p_b, s_b = step(
    restored["params"], restored["opt_state"], _place(grads, mesh_b)
  )
  chex.assert_trees_all_close(p_b, p_a, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s_b, s_a, rtol=1e-5, atol=1e-6)
