"""Tests for htmuon_jax.flax_layouts."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import htmuon_jax
from htmuon_jax.flax_layouts import flax_dimension_numbers

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
        num_heads=2, in_features=4, qkv_features=8, decode=False, rngs=rngs)
    self.conv = nnx.Conv(3, 5, kernel_size=(3, 3), rngs=rngs)
    self.head = nnx.Linear(4, 10, rngs=rngs)


EXPECTED = {
    "blocks/lin/kernel": MDN(1, 2), "blocks/lin/bias": None,
    "blocks/norm/scale": None,
    "emb/embedding": MDN(reduction_axis=1, output_axis=0),
    "attn/query/kernel": MDN(0, (1, 2)), "attn/key/kernel": MDN(0, (1, 2)),
    "attn/value/kernel": MDN(0, (1, 2)), "attn/out/kernel": MDN((0, 1), 2),
    "attn/query/bias": None, "attn/key/bias": None, "attn/value/bias": None,
    "attn/out/bias": None,
    "conv/kernel": MDN((0, 1, 2), 3), "conv/bias": None,
    "head/kernel": MDN(0, 1), "head/bias": None,
}


def _flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: x is None or isinstance(x, MDN))[0]
  return {"/".join(str(getattr(k, "key", k)) for k in p): v
          for p, v in leaves}


def test_nnx_layout_with_stacked_regex():
  state = nnx.state(Model(nnx.Rngs(0), names=False), nnx.Param)
  got = _flat(flax_dimension_numbers(state, stacked="^blocks/"))
  assert got == EXPECTED


def test_without_stacking_info_stacked_kernel_is_conv_like():
  # No scan info: a (L, in, out) kernel cannot be told from a conv1d kernel.
  state = nnx.state(Model(nnx.Rngs(0), names=False), nnx.Param)
  got = _flat(flax_dimension_numbers(state))
  assert got["blocks/lin/kernel"] == MDN((0, 1), 2)
  # A stacked (L, d) norm scale is never a matrix (optax's rule says 2-D).
  assert got["blocks/norm/scale"] is None


def test_linen_partitioned_scan_names():
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      k = self.param("kernel", nn.with_partitioning(
          nn.initializers.lecun_normal(), ("embed", "mlp")), (4, 4))
      s = self.param("scale", nn.with_partitioning(
          nn.initializers.ones, ("embed",)), (4,))
      return x @ k * s, None

  scanned = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={
      "params": True}, length=L, metadata_params={nn.PARTITION_NAME: "layers"})
  params = scanned().init(jax.random.key(0), jnp.ones((2, 4)), None)["params"]
  got = _flat(flax_dimension_numbers(params))
  assert got == {"kernel": MDN(1, 2), "scale": None}
  assert params["kernel"].names == ("layers", "embed", "mlp")


def test_overrides_and_embeddings_flag():
  state = nnx.state(Model(nnx.Rngs(0), names=False), nnx.Param)
  got = _flat(flax_dimension_numbers(
      state, stacked="^blocks/", embeddings=False,
      overrides={"^head/kernel$": None, "conv": MDN((0, 1), (2, 3))}))
  assert got["emb/embedding"] is None
  assert got["head/kernel"] is None
  assert got["conv/kernel"] == MDN((0, 1), (2, 3))
  assert got["blocks/lin/kernel"] == MDN(1, 2)


def test_nnx_optimizer_routes_stacked_kernels_per_layer():
  """Inside nnx.Optimizer: each stacked layer gets its own U S^p V^T."""
  model = Model(nnx.Rngs(0), names=False)
  dims = functools.partial(flax_dimension_numbers, stacked="^blocks/")
  lr, power = 0.1, 0.5
  opt = nnx.Optimizer(
      model, htmuon_jax.htmuon(lr, power, method="svd", nesterov=False,
                               muon_weight_dimension_numbers=dims),
      wrt=nnx.Param)
  before = np.asarray(model.blocks.lin.kernel[...])
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  grads["blocks"]["lin"]["kernel"] = nnx.Param(jnp.asarray(
      np.random.default_rng(0).standard_normal(before.shape), jnp.float32))
  opt.update(model, grads)
  after = np.asarray(model.blocks.lin.kernel[...])
  g = np.asarray(grads["blocks"]["lin"]["kernel"][...], np.float64)
  for i in range(L):
    # First step with bias correction: momentum = g. float64 reference.
    u, s, vt = np.linalg.svd(g[i], full_matrices=False)
    want = u @ np.diag(s ** power) @ vt * max(1.0, 6 / 4) ** 0.5
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
