"""`dimension_rules`, name-based norms and stacks, Flax bias-read output axes,
embedding/head policy, and Hugging Face-style parameter layouts (built by
hand from the `transformers` Flax and PyTorch models' names and shapes, no
download)."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import htmuon_jax
from htmuon_jax import MuonDimensionNumbers as MDN
from htmuon_jax import flax_dimension_numbers

V, P, D, L = 50, 16, 8, 3


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
