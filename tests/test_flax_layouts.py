"""Tests for htmuon_jax._flax_layouts."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import htmuon_jax
from htmuon_jax import flax_dimension_numbers

MDN = htmuon_jax.MuonDimensionNumbers
L = 3


class Block(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.lin = nnx.Linear(4, 6, rngs=rngs)
    self.norm = nnx.RMSNorm(6, rngs=rngs)


class Model(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, *, names: bool):
    meta = {nnx.PARTITION_NAME: "layers"} if names else {}

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=meta)
    def make(key):
      return Block(nnx.Rngs(key))

    self.blocks = make(jax.random.split(jax.random.key(0), L))
    self.emb = nnx.Embed(10, 4, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=2, in_features=4, qkv_features=8, decode=False, rngs=rngs
    )
    self.conv = nnx.Conv(3, 5, kernel_size=(3, 3), rngs=rngs)
    self.head = nnx.Linear(4, 10, rngs=rngs)


EXPECTED = {
  "blocks/lin/kernel": MDN(1, 2),
  "blocks/lin/bias": None,
  "blocks/norm/scale": None,
  # One rule for embeddings in every routing: vocab -> d (fan-in = vocab).
  "emb/embedding": MDN(reduction_axis=0, output_axis=1),
  "attn/query/kernel": MDN(0, (1, 2)),
  "attn/key/kernel": MDN(0, (1, 2)),
  "attn/value/kernel": MDN(0, (1, 2)),
  "attn/out/kernel": MDN((0, 1), 2),
  "attn/query/bias": None,
  "attn/key/bias": None,
  "attn/value/bias": None,
  "attn/out/bias": None,
  "conv/kernel": MDN((0, 1, 2), 3),
  "conv/bias": None,
  "head/kernel": MDN(0, 1),
  "head/bias": None,
}


def _flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: x is None or isinstance(x, MDN)
  )[0]
  return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in leaves}


def test_nnx_layout_with_stacked_regex():
  state = nnx.state(Model(nnx.Rngs(0), names=False), nnx.Param)
  got = _flat(flax_dimension_numbers(state, stacked="^blocks/"))
  assert got == EXPECTED


def test_nnx_layout_inferred_without_stacking_info():
  # No axis names, no `stacked=`: the stacked (L, 6) bias and norm scale of
  # `blocks` witness the stack, so its (L, 4, 6) kernel is L matrices.
  state = nnx.state(Model(nnx.Rngs(0), names=False), nnx.Param)
  assert _flat(flax_dimension_numbers(state)) == EXPECTED


def test_stacked_zero_turns_inference_off():
  # Without the stack, a (L, in, out) kernel is read like a conv1d kernel.
  state = nnx.state(Model(nnx.Rngs(0), names=False), nnx.Param)
  got = _flat(flax_dimension_numbers(state, stacked=0))
  assert got["blocks/lin/kernel"] == MDN((0, 1), 2)
  # A stacked (L, d) norm scale is never a matrix (optax's rule says 2-D).
  assert got["blocks/norm/scale"] is None


class BareBlock(nnx.Module):
  """No bias, no norm: nothing in its shapes tells that it is stacked."""

  def __init__(self, rngs: nnx.Rngs):
    self.lin = nnx.Linear(4, 6, use_bias=False, rngs=rngs)


@pytest.mark.parametrize("names", [False, True])
def test_stack_without_witness_needs_names(names):
  meta = {nnx.PARTITION_NAME: "layers"} if names else {}

  @nnx.vmap(in_axes=0, out_axes=0, transform_metadata=meta)
  def make(key):
    block = BareBlock(nnx.Rngs(key))
    if names:  # The scan axis name is recorded on annotated variables only.
      block.lin.kernel.set_metadata(out_sharding=(None, None))
    return block

  state = nnx.state(make(jax.random.split(jax.random.key(0), L)), nnx.Param)
  got = _flat(flax_dimension_numbers(state))
  assert got == {"lin/kernel": MDN(1, 2) if names else MDN((0, 1), 2)}


def test_infer_stacked_axes_rules():
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  params = {
    # Nested scans: (2, 3) stacked blocks in a stack of 2.
    "outer": {
      "norm": {"scale": f32(2, 8)},
      "inner": {
        "ln": {"scale": f32(2, 3, 8)},
        "mlp": {"kernel": f32(2, 3, 8, 8)},
      },
      "proj": {"kernel": f32(2, 8, 8)},
    },
    # Unstacked attention: (heads, head_dim) q bias is not a witness,
    # even with as many heads as model dims.
    "attn": {
      "query": {"kernel": f32(4, 4, 2), "bias": f32(4, 2)},
      "out": {"kernel": f32(4, 2, 4), "bias": f32(4)},
    },
    # A 2-D bias whose module's leaves do not share its leading size.
    "general": {"kernel": f32(8, 4, 2), "bias": f32(4, 2)},
    "head": {"kernel": f32(8, 2), "bias": f32(2)},
    "masked": optax.MaskedNode(),
  }
  got = _flat(htmuon_jax.infer_stacked_axes(params))
  assert got == {
    "outer/norm/scale": 1,
    "outer/inner/ln/scale": 2,
    "outer/inner/mlp/kernel": 2,
    "outer/proj/kernel": 1,
    "attn/query/kernel": 0,
    "attn/query/bias": 0,
    "attn/out/kernel": 0,
    "attn/out/bias": 0,
    "general/kernel": 0,
    "general/bias": 0,
    "head/kernel": 0,
    "head/bias": 0,
  }
  dims = _flat(htmuon_jax.resolve_dimension_numbers(None, params))
  assert dims["outer/inner/mlp/kernel"] == MDN(2, 3)
  assert dims["outer/proj/kernel"] == MDN(1, 2)
  assert dims["attn/query/kernel"] is None  # 3-D, unstacked: optax's rule.
  assert dims["head/kernel"] == MDN(0, 1)


def test_linen_scan_inferred_without_metadata():
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.LayerNorm()(nn.Dense(4)(x)), None

  scanned = nn.scan(
    Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=L
  )
  params = scanned().init(jax.random.key(0), jnp.ones((2, 4)), None)["params"]
  got = _flat(flax_dimension_numbers(params))
  assert got == {
    "Dense_0/kernel": MDN(1, 2),
    "Dense_0/bias": None,
    "LayerNorm_0/scale": None,
    "LayerNorm_0/bias": None,
  }
  assert _flat(htmuon_jax.resolve_dimension_numbers(None, params)) == got


def test_linen_partitioned_scan_names():
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      k = self.param(
        "kernel",
        nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
        (4, 4),
      )
      s = self.param(
        "scale", nn.with_partitioning(nn.initializers.ones, ("embed",)), (4,)
      )
      return x @ k * s, None

  scanned = nn.scan(
    Layer,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    length=L,
    metadata_params={nn.PARTITION_NAME: "layers"},
  )
  params = scanned().init(jax.random.key(0), jnp.ones((2, 4)), None)["params"]
  got = _flat(flax_dimension_numbers(params))
  assert got == {"kernel": MDN(1, 2), "scale": None}
  assert params["kernel"].names == ("layers", "embed", "mlp")


def test_overrides_and_embeddings_flag():
  state = nnx.state(Model(nnx.Rngs(0), names=False), nnx.Param)
  got = _flat(
    flax_dimension_numbers(
      state,
      stacked="^blocks/",
      embeddings=False,
      overrides={"^head/kernel$": None, "conv": MDN((0, 1), (2, 3))},
    )
  )
  assert got["emb/embedding"] is None
  assert got["head/kernel"] is None
  assert got["conv/kernel"] == MDN((0, 1), (2, 3))
  assert got["blocks/lin/kernel"] == MDN(1, 2)


@pytest.mark.parametrize(
  "dims", [None, functools.partial(flax_dimension_numbers, stacked="^blocks/")]
)
def test_nnx_optimizer_routes_stacked_kernels_per_layer(dims):
  """Inside nnx.Optimizer: each stacked layer gets its own U S^p V^T.

  By default (`dims=None`) too: the stack is inferred on the full tree,
  although the matrix branch of the partition only sees masked leaves.
  """
  model = Model(nnx.Rngs(0), names=False)
  lr, power = 0.1, 0.5
  opt = nnx.Optimizer(
    model,
    htmuon_jax.htmuon(
      lr,
      power,
      method="svd",
      nesterov=False,
      muon_weight_dimension_numbers=dims,
    ),
    wrt=nnx.Param,
  )
  before = np.asarray(model.blocks.lin.kernel[...])
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  grads["blocks"]["lin"]["kernel"] = nnx.Param(
    jnp.asarray(
      np.random.default_rng(0).standard_normal(before.shape), jnp.float32
    )
  )
  opt.update(model, grads)
  after = np.asarray(model.blocks.lin.kernel[...])
  g = np.asarray(grads["blocks"]["lin"]["kernel"][...], np.float64)
  for i in range(L):
    # First step with bias correction: momentum = g. float64 reference.
    u, s, vt = np.linalg.svd(g[i], full_matrices=False)
    want = u @ np.diag(s**power) @ vt * max(1.0, 6 / 4) ** 0.5
    # fp32 SVD vs float64: ~1e-6 relative.
    np.testing.assert_allclose(before[i] - after[i], lr * want, atol=1e-5)
  # The stacked norm scale went to AdamW: first step moves by ~lr * sign.
  scale = np.asarray(model.blocks.norm.scale[...])
  np.testing.assert_allclose(scale, 1.0 - lr, atol=1e-4)


def test_masked_nodes_kept():
  tree = {"a": optax.MaskedNode(), "kernel": jnp.ones((2, 3))}
  got = flax_dimension_numbers(tree)
  assert isinstance(got["a"], optax.MaskedNode)
  assert got["kernel"] == MDN(0, 1)


def test_inject_hyperparams_callable_dimension_numbers_names_static_args():
  params = {"conv": {"kernel": np.zeros((3, 3, 4, 8), np.float32)}}
  opt = optax.inject_hyperparams(htmuon_jax.htmuon)(
    0.02, muon_weight_dimension_numbers=flax_dimension_numbers
  )
  with pytest.raises(TypeError, match="static_args"):
    opt.init(params)
  opt = optax.inject_hyperparams(
    htmuon_jax.htmuon, static_args=("muon_weight_dimension_numbers",)
  )(0.02, muon_weight_dimension_numbers=flax_dimension_numbers)
  state = opt.init(params)
  routes = htmuon_jax.leaf_routes(params, flax_dimension_numbers)
  assert routes[0].branch == "spectral"
  del state
