"""Train a small LLaMA-style decoder with HTMuon, Muon, AdamW, ...

Flax NNX model: token embedding, pre-norm blocks (RMSNorm, multi-head
attention with rotary embeddings, SwiGLU MLP), final RMSNorm, LM head;
optionally `nnx.scan` over the blocks (their parameters are then stacked
along a leading layer axis). Byte- or character-level.

Offline by default (Python's own help text, `pydoc_data`); any
tensorflow-datasets text corpus with `--dataset tfds:NAME` (e.g.
`tfds:tiny_shakespeare`, `tfds:lm1b`; `--download` fetches it the first
time, into `--data-dir`).

    python examples/train_lm.py --optimizer htmuon --power 0.125 --steps 400
    python examples/train_lm.py --optimizer muon --scan --checkpoint-dir runs/ck
    python examples/train_lm.py --optimizer muon --scan --checkpoint-dir runs/ck --resume
    python examples/train_lm.py --optimizer htmuon --mesh data=2,fsdp=4 --distribute

It prints where the parameters went (spectral branch or AdamW), then a line
per `--log-every` steps. One BLAS thread unless `OPENBLAS_NUM_THREADS` is set
(more threads than free cores slow a step down many times).

Parameter split (`--split`): `authors` (default, as in the HTMuon code: every
>= 2-D weight, including the embedding and the LM head, goes to the spectral
optimizer, 1-D RMSNorm gains to AdamW) or `conventional` (embedding and head
to AdamW as well).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Optional

# Before numpy / jax load OpenBLAS: one thread unless the user chose.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import example_mesh  # noqa: E402

if __name__ == "__main__":
  # Multi-host flags: jax.distributed.initialize before the imports below
  # start jax (htmuon_jax builds a constant table on import).
  example_mesh.initialize()

import example_data  # noqa: E402
import example_utils  # noqa: E402

from htmuon_jax import diagnostics  # noqa: E402


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int
  dim: int = 64
  num_layers: int = 4
  num_heads: int = 4
  hidden_dim: Optional[int] = None  # SwiGLU width; default ~8/3 dim.
  rope_base: float = 10000.0
  scan: bool = False  # nnx.scan over the blocks (stacked parameters).

  @property
  def mlp_dim(self) -> int:
    if self.hidden_dim:
      return self.hidden_dim
    return 32 * max(1, round(8 * self.dim / 3 / 32))


def rotary(x: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding of `x` `(batch, seq, heads, head_dim)`."""
  seq, head_dim = x.shape[1], x.shape[3]
  half = head_dim // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def explicit_sharding(x: jax.Array) -> Optional[NamedSharding]:
  """`x`'s sharding under explicit mesh axes (None: no mesh, or auto)."""
  sharding = jax.typeof(x).sharding
  if AxisType.Explicit not in getattr(sharding.mesh, "axis_types", ()):
    return None
  return NamedSharding(sharding.mesh, sharding.spec)


class Attention(nnx.Module):
  """Causal multi-head self-attention with rotary embeddings."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    if cfg.dim % cfg.num_heads:
      raise ValueError("num_heads: must divide dim.")
    self.num_heads, self.rope_base = cfg.num_heads, cfg.rope_base
    linear = lambda: nnx.Linear(cfg.dim, cfg.dim, use_bias=False, rngs=rngs)
    self.q, self.k, self.v, self.o = linear(), linear(), linear(), linear()

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    q = rotary(heads(self.q(x)), self.rope_base)
    k = rotary(heads(self.k(x)), self.rope_base)
    y = jax.nn.dot_product_attention(q, k, heads(self.v(x)), is_causal=True)
    # A row-split `o` (tensor axis, explicit) contracts a split axis: its
    # output is split like `x` (jax asks to be told).
    return self.o(y.reshape(b, t, d), out_sharding=explicit_sharding(x))


class SwiGLU(nnx.Module):
  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.gate = nnx.Linear(cfg.dim, cfg.mlp_dim, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(cfg.dim, cfg.mlp_dim, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(cfg.mlp_dim, cfg.dim, use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(
      jax.nn.silu(self.gate(x)) * self.up(x), out_sharding=explicit_sharding(x)
    )


class Block(nnx.Module):
  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.attn_norm = nnx.RMSNorm(cfg.dim, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(cfg.dim, rngs=rngs)
    self.mlp = SwiGLU(cfg, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))


class LM(nnx.Module):
  """LLaMA-style decoder-only language model."""

  def __init__(self, cfg: LMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, rngs=rngs)
    if cfg.scan:

      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_blocks(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs)

      self.blocks = make_blocks(rngs)
    else:
      self.blocks = nnx.List(
        [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
      )
    self.norm = nnx.RMSNorm(cfg.dim, rngs=rngs)
    self.head = nnx.Linear(cfg.dim, cfg.vocab_size, use_bias=False, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    sharding = explicit_sharding(tokens)
    if sharding is not None:
      # Explicit mesh axes: a lookup of split tokens in a whole table is
      # ambiguous to jax unless told; its rows are split like the tokens.
      out = NamedSharding(sharding.mesh, P(*sharding.spec, None))
      x = self.embed(tokens, out_sharding=out)
    else:
      x = self.embed(tokens)
    if self.cfg.scan:

      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def run(x: jax.Array, block: Block) -> jax.Array:
        return block(x)

      x = run(x, self.blocks)
    else:
      for block in self.blocks:
        x = block(x)
    return self.head(self.norm(x))


def lm_dimension_numbers(
  params: Any, *, split: str = "authors", scan: bool = False
) -> Any:
  """Which parameters of `LM` are matrices, from their paths.

  * stacked (`scan=True`) block kernels `(layers, in, out)`: `layers`
    matrices (axis 0 is a batch axis); stacked norm gains `(layers, dim)` are
    not matrices;
  * the embedding table `(vocab, dim)` is one matrix with fan-out = vocab,
    as the authors' PyTorch code sees it (`nn.Embedding.weight`, rows/cols);
    with `split="conventional"` it goes to AdamW, as does the head.

  Args:
    params: the pure-dict parameters of an `LM`.
    split: `"authors"` or `"conventional"`.
    scan: whether the blocks are stacked.

  Returns:
    A tree of `MuonDimensionNumbers | None` like `params`.
  """
  if split not in ("authors", "conventional"):
    raise ValueError(
      f"split: expected 'authors' or 'conventional', got {split!r}."
    )

  def rule(path, leaf):
    names = example_utils.path_names(path)
    ndim = jnp.ndim(leaf)
    if names[0] in ("embed", "head") and split == "conventional":
      return None
    if names[0] == "embed":
      return MuonDimensionNumbers(reduction_axis=1, output_axis=0)
    if scan and names[0] == "blocks":
      return (
        MuonDimensionNumbers(reduction_axis=1, output_axis=2)
        if ndim == 3
        else None
      )
    return MuonDimensionNumbers() if ndim == 2 else None

  return jax.tree_util.tree_map_with_path(rule, params)


def lm_loss(
  model: LM, batch: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Next-token cross-entropy (nats per token)."""
  logits = model(batch[:, :-1])
  loss = optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), batch[:, 1:]
  ).mean()
  return loss, {}


def parser() -> argparse.ArgumentParser:
  p = example_utils.new_parser(__doc__)
  example_utils.add_optimizer_flags(p)
  p.add_argument(
    "--split",
    default="authors",
    choices=("authors", "conventional"),
    help="authors: embedding and head are matrices too; "
    "conventional: they go to AdamW",
  )
  example_utils.add_dataset_flags(
    p,
    default=example_data.TEXT_DEFAULT,
    offline="'pydoc' (offline)",
    example="tfds:tiny_shakespeare",
  )
  p.add_argument(
    "--max-chars",
    type=int,
    default=None,
    help="read at most this many characters (default: all)",
  )
  p.add_argument(
    "--tokenizer",
    default="char",
    choices=("char", "byte"),
    help="character- or byte-level tokens",
  )
  p.add_argument("--dim", type=int, default=64, help="model width")
  p.add_argument("--layers", type=int, default=4, help="transformer blocks")
  p.add_argument("--heads", type=int, default=4, help="attention heads")
  p.add_argument(
    "--scan",
    action="store_true",
    help="nnx.scan over the blocks (stacked parameters)",
  )
  p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
  p.add_argument(
    "--batch-size",
    type=example_utils.positive_int_flag,
    default=16,
    help="sequences per batch",
  )
  p.add_argument(
    "--eval-batches", type=int, default=8, help="validation batches (fixed)"
  )
  example_utils.add_training_flags(p, steps=400, eval_every=100)
  example_mesh.add_mesh_flags(p)
  return p


def build(
  args: argparse.Namespace, layout: Optional[example_mesh.Layout] = None
):
  """Data, model and optimizer for `args` (on `layout`'s mesh, if any)."""
  text = example_data.load_text(
    args.dataset,
    max_chars=args.max_chars,
    data_dir=args.data_dir,
    download=args.download,
  )
  tok = example_data.Tokenizer.fit(text, args.tokenizer)
  train_tokens, val_tokens = example_data.split_tokens(tok.encode(text))
  cfg = LMConfig(
    vocab_size=tok.vocab_size,
    dim=args.dim,
    num_layers=args.layers,
    num_heads=args.heads,
    scan=args.scan,
  )
  model = LM(cfg, rngs=nnx.Rngs(args.seed))
  dims = lambda p: lm_dimension_numbers(p, split=args.split, scan=args.scan)
  lr = (
    args.lr if args.lr is not None else example_utils.default_lr(args.optimizer)
  )
  tx = example_utils.make_optimizer(
    args.optimizer,
    learning_rate=lr,
    total_steps=args.steps,
    weight_decay=args.weight_decay,
    weight_dimension_numbers=dims,
    power=args.power,
    method=args.method,
    adam_lr=args.adam_lr,
    distribute=layout.mesh if layout and args.distribute else None,
  )
  data = dict(train=train_tokens, val=val_tokens, tokenizer=tok)
  return cfg, model, tx, data, dims, lr


def main(
  argv: Optional[list[str]] = None, *, ignored_flags: str = "error"
) -> dict[str, Any]:
  """Runs the script; `ignored_flags="warn"` only warns about optimizer
  flags that the chosen optimizer ignores (see `example_utils.parse_args`)."""
  example_mesh.initialize(argv)  # Multi-host: before any jax computation.
  p = parser()
  args = example_utils.parse_args(p, argv, ignored_flags=ignored_flags)
  example_mesh.check_args(p, args)
  layout = example_mesh.layout(args)
  cfg, model, tx, data, dims, lr = build(args, layout)
  print(
    example_utils.routing_line(
      args.optimizer, nnx.to_pure_dict(nnx.state(model, nnx.Param)), dims
    )
  )
  batch_fn = lambda step: example_data.lm_batch(
    data["train"], step, args.batch_size, args.seq_len, args.seed
  )
  eval_batches = example_data.lm_eval_batches(
    data["val"], args.eval_batches, args.batch_size, args.seq_len, args.seed
  )
  result = example_utils.train(
    model,
    tx,
    loss_fn=lm_loss,
    batch_fn=batch_fn,
    eval_batches=eval_batches,
    steps=args.steps,
    eval_every=args.eval_every,
    log_every=args.log_every,
    checkpoint_dir=args.checkpoint_dir,
    checkpoint_every=args.checkpoint_every,
    resume=args.resume,
    overwrite=args.overwrite,
    config=example_utils.run_config(args),
    stop_after=args.stop_after,
    items_per_batch=args.batch_size * args.seq_len,
    items_name="tokens",
    progress=not args.no_progress,
    desc=args.optimizer,
    alpha_monitor=diagnostics.AlphaMonitor(
      dims, every=args.alpha_every, xmin=args.alpha_xmin
    )
    if args.alpha_every
    else None,
    layout=layout,
    compiled_stats=args.compiled_stats,
  )
  result["config"] = {
    **vars(args),
    "lr": lr,
    "vocab_size": cfg.vocab_size,
    "num_params": int(sum(x.size for x in jax.tree.leaves(result["params"]))),
  }
  result["model"], result["dimension_numbers"] = model, dims
  example_utils.write_json(
    args.metrics_json,
    {
      k: v for k, v in result.items() if k not in ("model", "dimension_numbers")
    },
  )
  print(
    f"{args.optimizer}: final train loss {result['final_train_loss']:.4f}, "
    f"val loss {result['final_val_loss']:.4f}, "
    f"{1e3 * result['time_per_step_s']:.1f} ms/step "
    f"({result['tokens_per_s']:,.0f} tokens/s)"
  )
  return result


if __name__ == "__main__":
  example_utils.run(main, example_data.DataNotAvailableError)
