"""The layouts engine (`htmuon_jax._layouts`): dimension numbers and the
`(batch, fan_in, fan_out)` view, the default routing and stacked layers,
`describe_routing` / `leaf_routes` (and that the optimizer agrees), Flax
layouts, `dimension_rules`, and Hugging Face-style parameter layouts (built
by hand from the `transformers` Flax and PyTorch models' names and shapes,
no download). Equinox trees: tests/test_equinox.py."""

from __future__ import annotations

import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax.contrib import MuonDimensionNumbers as DN

import htmuon_jax
from htmuon_jax import _layouts as dn
from htmuon_jax import flax_dimension_numbers

MDN = DN
V, P, D, L = 50, 16, 8, 3


# === Dimension numbers, matrices, the default routing ========================


def test_default_rule_marks_2d_leaves():
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4), "k": jnp.ones((2, 3, 4))}
  tree = dn.resolve_dimension_numbers(None, params)
  assert tree == {"w": DN(), "b": None, "k": None}


def test_single_dimension_numbers_broadcast():
  params = {"a": jnp.ones((3, 4)), "b": jnp.ones((5, 6))}
  spec = DN(1, 0)
  assert dn.resolve_dimension_numbers(spec, params) == {"a": spec, "b": spec}


def test_prefix_tree_and_callable():
  params = {
    "enc": {"w": jnp.ones((3, 4)), "w2": jnp.ones((4, 4))},
    "norm": jnp.ones(4),
  }
  prefix = {"enc": DN(), "norm": None}
  expected = {"enc": {"w": DN(), "w2": DN()}, "norm": None}
  assert dn.resolve_dimension_numbers(prefix, params) == expected
  assert dn.resolve_dimension_numbers(lambda p: prefix, params) == expected


def test_masked_nodes_are_kept():
  updates = {"w": jnp.ones((3, 4)), "b": optax.MaskedNode()}
  tree = dn.resolve_dimension_numbers({"w": DN(), "b": None}, updates)
  assert tree == {"w": DN(), "b": optax.MaskedNode()}


def test_structure_mismatch_is_reported():
  with pytest.raises(ValueError, match="weight_dimension_numbers"):
    dn.resolve_dimension_numbers({"x": DN()}, {"w": jnp.ones((2, 2))})


@pytest.mark.parametrize(
  "shape, spec, flat",
  [
    ((3, 4), DN(), (1, 3, 4)),
    ((3, 4), DN(1, 0), (1, 4, 3)),
    ((3, 3, 4, 8), DN((0, 1, 2), 3), (1, 36, 8)),  # conv kernel
    ((5, 6, 7), DN(1, 2), (5, 6, 7)),  # stacked layers
    ((6, 2, 3), DN(0, (1, 2)), (1, 6, 6)),  # attention (d, heads, hd)
    ((2, 6, 5, 3), DN(-3, -1), (10, 6, 3)),  # negative axes, two batch
  ],
)
def test_to_matrices_round_trip(shape, spec, flat):
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  m = dn.to_matrices(x, spec)
  chex.assert_shape(m, flat)
  chex.assert_trees_all_equal(dn.from_matrices(m, spec, shape), x)


def test_to_matrices_layout_of_conv_kernel():
  x = jnp.arange(3 * 3 * 4 * 8, dtype=jnp.float32).reshape(3, 3, 4, 8)
  m = dn.to_matrices(x, DN((0, 1, 2), 3))
  # fan-in flattens (h, w, in) in order; fan-out is the channel axis.
  chex.assert_trees_all_equal(m[0], x.reshape(36, 8))


def test_fan_in_fan_out():
  assert dn.fan_in_fan_out((3, 3, 4, 8), DN((0, 1, 2), 3)) == (36, 8)
  assert dn.fan_in_fan_out((5, 6, 7), DN(1, 2)) == (6, 7)


@pytest.mark.parametrize(
  "shape, spec, match",
  [
    ((4,), DN(), "needs a matrix"),
    ((3, 4), DN(0, 0), "disjoint"),
    ((3, 4), DN(0, 2), "out of range"),
    ((3, 4), DN((), 1), "at least one axis"),
  ],
)
def test_invalid_dimension_numbers(shape, spec, match):
  with pytest.raises(ValueError, match=match):
    dn.to_matrices(jnp.ones(shape), spec)


def test_default_rule_never_routes_norm_scales_or_biases():
  params = {
    "layers": {"norm": {"scale": jnp.ones((3, 5))}, "bias": jnp.ones((3, 5))},
    "w": jnp.ones((4, 5)),
  }
  tree = dn.resolve_dimension_numbers(None, params)
  assert tree == {"layers": {"norm": {"scale": None}, "bias": None}, "w": DN()}


def _dims(tree):
  is_leaf = lambda x: x is None or isinstance(x, DN)
  return {
    "/".join(str(getattr(k, "key", "")) for k in path if hasattr(k, "key")): d
    for path, d in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
  }


def test_default_rule_reads_flax_scan_axis_names():
  from flax import nnx

  boxed = lambda v, names: nnx.Param(
    v, out_sharding=names, eager_sharding=False
  )
  state = {
    "kernel": boxed(jnp.ones((3, 4, 5)), ("layers", None, None)),
    "late": boxed(jnp.ones((4, 3, 5)), (None, "layers", None)),
    "scale": boxed(jnp.ones((3, 5)), ("layers", None)),
    "w": nnx.Param(jnp.ones((4, 5))),
    "conv": nnx.Param(jnp.ones((3, 3, 4, 5))),
  }
  dims = _dims(dn.resolve_dimension_numbers(None, state))
  assert dims == {
    "kernel": DN(1, 2),
    "late": DN(0, 2),
    "scale": None,
    "w": DN(),
    "conv": None,
  }


def test_default_rule_treats_a_stack_like_its_layers():
  # Scanned blocks: (L, in, out) kernels are L matrices, the (L, d) norm
  # scale is not a matrix; unstacked leaves follow optax's 2-D rule.
  params = {
    "blocks": {
      "norm": {"scale": jnp.ones((3, 5))},
      "mlp": {"kernel": jnp.ones((3, 5, 8))},
      "heads": {"kernel": jnp.ones((3, 5, 2, 4))},
    },
    "embed": {"embedding": jnp.ones((7, 5))},
    "conv1d": {"kernel": jnp.ones((3, 5, 8)), "bias": jnp.ones((8,))},
  }
  assert _dims(dn.resolve_dimension_numbers(None, params)) == {
    "blocks/norm/scale": None,
    "blocks/mlp/kernel": DN(1, 2),
    "blocks/heads/kernel": None,  # 3-D once unstacked, as unstacked 3-D.
    "embed/embedding": DN(),
    "conv1d/kernel": None,
    "conv1d/bias": None,
  }


# === Routing reports: describe_routing, leaf_routes ==========================


def _params():
  """A conv kernel, a dense layer, a scanned (stacked) block, an unnamed 3-D
  leaf: the cases the default routing treats differently."""
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
    "conv": {"kernel": normal(3, 3, 4, 8)},
    "dense": {"kernel": normal(8, 10), "bias": normal(10)},
    "blocks": {
      "mlp": {"kernel": normal(2, 8, 8), "bias": normal(2, 8)},
      "norm": {"scale": normal(2, 8)},
    },
    "pos": normal(2, 3, 4),
  }


def _by_path(routes):
  return {r.path: r for r in routes}


def test_default_routing_table_says_what_goes_where_and_why():
  routes = _by_path(htmuon_jax.leaf_routes(_params()))
  assert routes["dense/kernel"].branch == "spectral"
  assert routes["dense/kernel"].matrix_shape == (8, 10)
  assert routes["dense/kernel"].num_matrices == 1
  # The scanned stack: 2 matrices of (8, 8); its stacked bias and norm gain
  # are not matrices.
  assert routes["blocks/mlp/kernel"].num_matrices == 2
  assert routes["blocks/mlp/kernel"].matrix_shape == (8, 8)
  assert routes["blocks/norm/scale"].reason == "named 'scale'"
  assert routes["blocks/mlp/bias"].branch == "adamw"
  assert routes["dense/bias"].reason == "1-D"
  assert routes["conv/kernel"].reason == "4-D"
  assert routes["pos"].reason == "3-D"
  text = htmuon_jax.describe_routing(_params())
  lines = text.splitlines()
  assert lines[0].startswith(
    "routing: 3 matrices in 2 leaves to the spectral branch, 5 leaves to AdamW"
  )
  # The surprising AdamW leaves are named in the summary, with a hint.
  assert "conv/kernel (3, 3, 4, 8)" in lines[0] and "pos (2, 3, 4)" in lines[0]
  assert "flax_dimension_numbers" in lines[0]
  # One table row per leaf after the summary and the header.
  assert len(lines) == 2 + len(routes)
  assert any(
    l.split()[:2] == ["spectral", "blocks/mlp/kernel"] and "2 x (8, 8)" in l
    for l in lines
  )
  assert htmuon_jax.describe_routing(_params(), summary=True) == lines[0]


def test_explicit_dimension_numbers_make_the_conv_kernel_a_matrix():
  routes = _by_path(htmuon_jax.leaf_routes(_params(), flax_dimension_numbers))
  assert routes["conv/kernel"].branch == "spectral"
  assert routes["conv/kernel"].matrix_shape == (3 * 3 * 4, 8)
  assert routes["dense/bias"].reason == "1-D"
  summary = htmuon_jax.describe_routing(
    _params(), flax_dimension_numbers, summary=True
  )
  assert "the default routing" not in summary  # no hint: the user chose
  assert "as weight_dimension_numbers says" in summary


def test_routes_match_what_the_optimizer_does():
  """With a zero AdamW learning rate only the spectral leaves move."""
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  for dims in (None, flax_dimension_numbers):
    tx = htmuon_jax.htmuon(
      0.1,
      method="svd",
      adam_learning_rate=0.0,
      muon_weight_dimension_numbers=dims,
    )
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    moved = {
      jax.tree_util.keystr(p, simple=True, separator="/"): bool(jnp.any(u != 0))
      for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]
    }
    routes = _by_path(htmuon_jax.leaf_routes(params, dims))
    assert moved == {p: r.branch == "spectral" for p, r in routes.items()}


def test_flax_boxes_are_named_without_value_suffix():
  from flax import nnx

  model = nnx.Sequential(
    nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0)), nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  )
  routes = _by_path(htmuon_jax.leaf_routes(nnx.state(model, nnx.Param)))
  assert set(routes) == {
    "layers/0/kernel",
    "layers/0/bias",
    "layers/1/kernel",
    "layers/1/bias",
  }
  assert routes["layers/0/kernel"].reason == "4-D"
  assert routes["layers/1/kernel"].matrix_shape == (4, 3)


# === Flax layouts: flax_dimension_numbers, stacked layers ====================


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


# === Routing rules and Hugging Face layouts ==================================


def _routes(params, dims=None):
  return {r.path: r for r in htmuon_jax.leaf_routes(params, dims)}


def _z(*shape):
  return np.zeros(shape, np.float32)


def hf_flax_gpt2(layers=2):
  """`FlaxGPT2LMHeadModel` params: `Conv1D` kernels stored `(out, in)`,
  tied head (no `lm_head` leaf)."""
  block = lambda: {
    "ln_1": {"scale": _z(D), "bias": _z(D)},
    "attn": {
      "c_attn": {"kernel": _z(3 * D, D), "bias": _z(3 * D)},
      "c_proj": {"kernel": _z(D, D), "bias": _z(D)},
    },
    "ln_2": {"scale": _z(D), "bias": _z(D)},
    "mlp": {
      "c_fc": {"kernel": _z(4 * D, D), "bias": _z(4 * D)},
      "c_proj": {"kernel": _z(D, 4 * D), "bias": _z(D)},
    },
  }
  return {
    "transformer": {
      "wte": {"embedding": _z(V, D)},
      "wpe": {"embedding": _z(P, D)},
      "h": {str(i): block() for i in range(layers)},
      "ln_f": {"scale": _z(D), "bias": _z(D)},
    }
  }


def hf_flax_bert():
  """`FlaxBertForMaskedLM` params (one layer), untied decoder."""
  dense = lambda i, o: {"kernel": _z(i, o), "bias": _z(o)}
  ln = {"scale": _z(D), "bias": _z(D)}
  return {
    "bert": {
      "embeddings": {
        "word_embeddings": {"embedding": _z(V, D)},
        "position_embeddings": {"embedding": _z(P, D)},
        "token_type_embeddings": {"embedding": _z(2, D)},
        "LayerNorm": dict(ln),
      },
      "encoder": {
        "layer": {
          "0": {
            "attention": {
              "self": {
                "query": dense(D, D),
                "key": dense(D, D),
                "value": dense(D, D),
              },
              "output": {"dense": dense(D, D), "LayerNorm": dict(ln)},
            },
            "intermediate": {"dense": dense(D, 4 * D)},
            "output": {"dense": dense(4 * D, D), "LayerNorm": dict(ln)},
          }
        }
      },
    },
    "cls": {
      "predictions": {
        "transform": {"dense": dense(D, D), "LayerNorm": dict(ln)},
        "decoder": {"kernel": _z(D, V)},
        "bias": _z(V),
      }
    },
  }


def hf_torch_llama(stacked=False, kv=4, f=24):
  """`LlamaForCausalLM` state-dict names and `(out, in)` shapes, as nested
  dicts; `stacked`: the layers stacked along a leading axis (a scan)."""
  lead = (L,) if stacked else ()
  layer = {
    "self_attn": {
      "q_proj": {"weight": _z(*lead, D, D)},
      "k_proj": {"weight": _z(*lead, kv, D)},
      "v_proj": {"weight": _z(*lead, kv, D)},
      "o_proj": {"weight": _z(*lead, D, D)},
    },
    "mlp": {
      "gate_proj": {"weight": _z(*lead, f, D)},
      "up_proj": {"weight": _z(*lead, f, D)},
      "down_proj": {"weight": _z(*lead, D, f)},
    },
    "input_layernorm": {"weight": _z(*lead, D)},
    "post_attention_layernorm": {"weight": _z(*lead, D)},
  }
  layers = layer if stacked else {"0": layer}
  return {
    "model": {
      "embed_tokens": {"weight": _z(V, D)},
      "layers": layers,
      "norm": {"weight": _z(D)},
    },
    "lm_head": {"weight": _z(V, D)},
  }


# --- Hugging Face layouts ---------------------------------------------------


def test_hf_flax_gpt2_conv1d_kernels_need_out_in_and_rules_say_it():
  params = hf_flax_gpt2()
  c_fc = "transformer/h/0/mlp/c_fc/kernel"
  # By name a `kernel` is `(in, out)`: GPT-2's `(4d, d)` c_fc reads inverted.
  assert _routes(params)[c_fc].matrix_shape == (4 * D, D)
  rules = htmuon_jax.dimension_rules({r"/c_(attn|proj|fc)/kernel$": "out in"})
  r = _routes(params, rules)
  assert r[c_fc].matrix_shape == (D, 4 * D)
  assert r["transformer/h/0/attn/c_attn/kernel"].matrix_shape == (D, 3 * D)
  assert r["transformer/h/1/mlp/c_proj/kernel"].matrix_shape == (4 * D, D)
  assert r["transformer/wte/embedding"].matrix_shape == (V, D)
  assert r["transformer/h/0/attn/c_attn/bias"].branch == "adamw"
  assert r["transformer/ln_f/scale"].branch == "adamw"
  off = htmuon_jax.dimension_rules(
    {r"/c_(attn|proj|fc)/kernel$": "out in"}, embeddings="adamw"
  )
  r = _routes(params, off)
  assert r["transformer/wte/embedding"].reason == "embedding"
  assert r["transformer/wpe/embedding"].branch == "adamw"
  assert r[c_fc].matrix_shape == (D, 4 * D)


def test_hf_flax_bert_embeddings_one_orientation_and_policies():
  params = hf_flax_bert()
  word = "bert/embeddings/word_embeddings/embedding"
  decoder = "cls/predictions/decoder/kernel"
  default = _routes(params)
  flax = _routes(params, flax_dimension_numbers)
  rules = _routes(params, htmuon_jax.dimension_rules())
  # One rule for embeddings in every routing: vocab -> d, shape factor 1.
  for r in (default, flax, rules):
    assert r[word].matrix_shape == (V, D)
    assert r["bert/encoder/layer/0/intermediate/dense/kernel"].matrix_shape == (
      D,
      4 * D,
    )
    assert r["bert/embeddings/LayerNorm/scale"].branch == "adamw"
  authors = _routes(params, htmuon_jax.dimension_rules(embeddings="authors"))
  assert authors[word].matrix_shape == (D, V)
  authors = _routes(
    params, functools.partial(flax_dimension_numbers, embeddings="authors")
  )
  assert authors[word].matrix_shape == (D, V)
  # The MLM decoder is found by shape only, not by name: a rule names it.
  conventional = htmuon_jax.dimension_rules(
    {r"predictions/decoder/": "adamw"}, embeddings="adamw"
  )
  r = _routes(params, conventional)
  assert r[word].branch == r[decoder].branch == "adamw"
  assert r[decoder].reason.startswith("rule")
  assert r["bert/encoder/layer/0/attention/self/query/kernel"].branch == (
    "spectral"
  )
  flax_off = _routes(
    params,
    functools.partial(flax_dimension_numbers, embeddings=False),
  )
  assert flax_off[word].branch == "adamw"


@pytest.mark.parametrize("stacked", [False, True])
def test_hf_torch_llama_out_in_with_embeddings_and_head_to_adamw(stacked):
  params = hf_torch_llama(stacked)
  rules = htmuon_jax.dimension_rules(
    orientation="out_in", embeddings="adamw", head="adamw"
  )
  r = _routes(params, rules)
  pre = "model/layers/" + ("" if stacked else "0/")
  n = L if stacked else 1
  assert r[pre + "self_attn/q_proj/weight"].matrix_shape == (D, D)
  assert r[pre + "self_attn/k_proj/weight"].matrix_shape == (D, 4)
  assert r[pre + "mlp/gate_proj/weight"].matrix_shape == (D, 24)
  assert r[pre + "mlp/down_proj/weight"].matrix_shape == (24, D)
  assert r[pre + "mlp/down_proj/weight"].num_matrices == n
  for norm in ("input_layernorm", "post_attention_layernorm"):
    assert r[pre + norm + "/weight"].branch == "adamw"
  assert r["model/norm/weight"].branch == "adamw"
  assert r["model/embed_tokens/weight"].reason == "embedding"
  assert r["lm_head/weight"].reason == "output head"
  # Spectral head and embedding: head (out, in), embedding vocab -> d.
  r = _routes(params, htmuon_jax.dimension_rules(orientation="out_in"))
  assert r["lm_head/weight"].matrix_shape == (D, V)
  assert r["model/embed_tokens/weight"].matrix_shape == (V, D)


def test_stacked_norm_weights_by_name_are_witnesses_and_not_matrices():
  # Item 5 without layer types: an Equinox-named block stacked L times,
  # bias-free projections, two LayerNorms (weight, bias) or weight-only.
  for norm in ({"weight": _z(L, D), "bias": _z(L, D)}, {"weight": _z(L, D)}):
    block = {
      "norm1": dict(norm),
      "wq": {"weight": _z(L, D, D)},
      "norm2": dict(norm),
      "w2": {"weight": _z(L, D, 2 * D)},
    }
    r = _routes({"blocks": block, "head": {"weight": _z(D, V)}})
    assert r["blocks/wq/weight"].num_matrices == L
    assert r["blocks/w2/weight"].num_matrices == L
    assert r["blocks/norm1/weight"].branch == "adamw"
    assert r["blocks/norm2/weight"].branch == "adamw"
    assert r["head/weight"].num_matrices == 1


# --- dimension_rules ----------------------------------------------------------


def test_rule_layouts_axes_and_fall_through():
  params = {
    "conv": {"weight": _z(8, 4, 3, 3), "bias": _z(8)},  # PyTorch Conv2d
    "q": {"kernel": _z(D, 2, 4)},
    "gain": {"weight": _z(D)},
  }
  rules = htmuon_jax.dimension_rules(
    {
      r"conv/": "out in window window",
      r"^q/": "in out out",
      r"gain": "out in",  # rank 1: not a matrix, falls through
    }
  )
  dims = htmuon_jax.resolve_dimension_numbers(rules, params)
  assert dims["conv"]["weight"] == MDN(reduction_axis=(1, 2, 3), output_axis=0)
  assert dims["conv"]["bias"] is None
  assert dims["q"]["kernel"] == MDN(reduction_axis=0, output_axis=(1, 2))
  assert dims["gain"]["weight"] is None
  only = htmuon_jax.dimension_rules({r"^q/": "in out out"}, default=None)
  dims = htmuon_jax.resolve_dimension_numbers(only, params)
  assert dims["conv"]["weight"] is None and dims["q"]["kernel"] is not None
  with pytest.raises(ValueError, match="layout"):
    htmuon_jax.dimension_rules({"x": "rows cols"})
  with pytest.raises(ValueError, match="orientation"):
    htmuon_jax.dimension_rules(orientation="cols")
  with pytest.raises(ValueError, match="embeddings"):
    htmuon_jax.dimension_rules(embeddings="sgd")


def test_rules_are_hashable_values_and_not_callable():
  a = htmuon_jax.dimension_rules({"w": "out in"}, head="adamw")
  b = htmuon_jax.dimension_rules({"w": "out in"}, head="adamw")
  assert a == b and hash(a) == hash(b) and not callable(a)
  assert "out in" in repr(a)


@pytest.mark.parametrize("alias", sorted(htmuon_jax.ALIASES))
def test_every_alias_takes_rules_and_inject_hyperparams_keeps_them(alias):
  params = {
    "conv": {"weight": jnp.ones((4, 2, 3, 3)), "bias": jnp.ones(4)},
    "dense": {"weight": jnp.ones((3, 5))},
  }
  rules = htmuon_jax.dimension_rules(
    {r"conv/weight": "out in window window"}, orientation="out_in"
  )
  grads = jax.tree.map(
    lambda x: x * jnp.arange(x.size).reshape(x.shape), params
  )
  factory = htmuon_jax.ALIASES[alias]
  plain = factory(0.02, muon_weight_dimension_numbers=rules)
  injected = optax.inject_hyperparams(factory)(
    learning_rate=0.02, muon_weight_dimension_numbers=rules
  )
  default = factory(0.02)
  want, _ = plain.update(grads, plain.init(params), params)
  got, _ = injected.update(grads, injected.init(params), params)
  base, _ = default.update(grads, default.init(params), params)
  for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    # Injected hyperparameters are traced: equal up to fp32 round-off.
    np.testing.assert_allclose(w, g, rtol=1e-3, atol=1e-6)
  # The conv weight is a matrix under the rules, AdamW by default.
  assert not np.allclose(want["conv"]["weight"], base["conv"]["weight"])


def test_equinox_types_with_rules_policies():
  import equinox as eqx

  key = jax.random.key(0)
  model = {
    "tok": eqx.nn.Embedding(V, D, key=key),  # no embedding name: by type
    "head": eqx.nn.Linear(D, V, use_bias=False, key=key),
  }
  params = eqx.filter(model, eqx.is_array)
  r = _routes(params)
  assert r["tok/weight"].matrix_shape == (V, D)
  assert r["head/weight"].matrix_shape == (D, V)
  off = htmuon_jax.dimension_rules(embeddings="adamw", head="adamw")
  r = _routes(params, off)
  assert r["tok/weight"].branch == r["head/weight"].branch == "adamw"
  authors = _routes(params, htmuon_jax.dimension_rules(embeddings="authors"))
  assert authors["tok/weight"].matrix_shape == (D, V)
  opt = htmuon_jax.htmuon(0.02, muon_weight_dimension_numbers=off)
  opt.update(params, opt.init(params), params)


# --- flax_dimension_numbers: output axes from the bias ------------------------


def test_linen_dense_general_output_axes_from_bias_whatever_the_name():
  import flax.linen as nn

  class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
      q = nn.DenseGeneral((4, 16), name="q_proj")(x)
      o = nn.DenseGeneral(64, axis=(-2, -1), name="o_proj")(q)
      return nn.DenseGeneral((4, 16), use_bias=False, name="mystery")(o)

  params = Attn().init(jax.random.key(0), jnp.ones((2, 64)))["params"]
  with pytest.warns(UserWarning, match="mystery"):
    dims = flax_dimension_numbers(params)
  assert dims["q_proj"]["kernel"] == MDN(reduction_axis=0, output_axis=(1, 2))
  assert dims["o_proj"]["kernel"] == MDN(reduction_axis=(0, 1), output_axis=2)
  r = _routes(params, dims)
  assert r["q_proj/kernel"].matrix_shape == (64, 64)
  assert r["o_proj/kernel"].matrix_shape == (64, 64)
  # Bias-free but named like a projection: no warning.
  bare = {"wq": {"kernel": _z(64, 4, 16)}, "conv1": {"kernel": _z(3, 4, 8)}}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    dims = flax_dimension_numbers(bare)
  assert dims["wq"]["kernel"] == MDN(reduction_axis=0, output_axis=(1, 2))
  assert dims["conv1"]["kernel"] == MDN(reduction_axis=(0, 1), output_axis=2)


def test_flax_head_policy():
  params = {
    "embed": {"embedding": _z(V, D)},
    "lm_head": {"kernel": _z(D, V), "bias": _z(V)},
  }
  dims = flax_dimension_numbers(params, embeddings="adamw", head="adamw")
  assert dims["embed"]["embedding"] is None
  assert dims["lm_head"]["kernel"] is None
  with pytest.raises(ValueError, match="head"):
    flax_dimension_numbers(params, head="sgd")


def test_nnx_linear_general_output_axes_from_bias():
  from flax import nnx

  class Attn(nnx.Module):
    def __init__(self, rngs):
      self.q_proj = nnx.LinearGeneral(64, (4, 16), rngs=rngs)
      self.o_proj = nnx.LinearGeneral((4, 16), 64, axis=(-2, -1), rngs=rngs)

  state = nnx.state(Attn(nnx.Rngs(0)), nnx.Param)
  r = _routes(state, flax_dimension_numbers)
  assert r["q_proj/kernel"].matrix_shape == (64, 64)
  assert r["o_proj/kernel"].matrix_shape == (64, 64)
  assert r["q_proj/bias"].branch == "adamw"


def test_embeddings_are_tables_not_layers_or_convs_named_so():
  import equinox as eqx

  # An Equinox `Linear` named like an embedding is read by its type.
  linear = eqx.nn.Linear(8, 16, key=jax.random.key(0))
  params = eqx.filter({"embed_proj": linear}, eqx.is_array)
  off = htmuon_jax.dimension_rules(embeddings="adamw")
  for dims in (None, htmuon_jax.dimension_rules(), off):
    assert _routes(params, dims)["embed_proj/weight"].matrix_shape == (8, 16)
  # A ViT patch embedding is a conv, the position table an embedding.
  vit = {
    "patch_embed": {"kernel": _z(3, 3, 3, D), "bias": _z(D)},
    "pos_embed": {"embedding": _z(P, D)},
  }
  rules = htmuon_jax.dimension_rules(default="flax", embeddings="adamw")
  r = _routes(vit, rules)
  assert r["patch_embed/kernel"].matrix_shape == (27, D)
  assert r["pos_embed/embedding"].reason == "embedding"
