"""Train a small Equinox transformer LM with HTMuon, Muon, AdamW, ...

Equinox model: token `Embedding`, pre-norm blocks (`LayerNorm`,
`MultiheadAttention` with a causal mask, a GELU MLP of two `Linear`s), final
`LayerNorm`, `Linear` LM head. With `--scan` the blocks are built with
`eqx.filter_vmap` (their weights stacked along a leading layer axis) and run
with `jax.lax.scan`. Character-level, on Python's own help text
(`pydoc_data`, offline) by default, as `train_lm.py`.

    python examples/train_equinox.py --optimizer htmuon --steps 300
    python examples/train_equinox.py --optimizer muon --scan --embeddings adamw --head adamw

The optimizer sees `eqx.filter(model, eqx.is_array)` (`None` leaves for the
non-arrays) and routes it by default: Equinox's layers are read with their
true axes (`Linear` weights `(out, in)`, `Embedding` vocab -> d, norms and
biases to AdamW, stacked blocks as batches of matrices); `--embeddings` /
`--head` send the embedding and the LM head to AdamW
(`htmuon_jax.dimension_rules`). It prints the routing, then a line per
`--log-every` steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional

# Before numpy / jax load OpenBLAS: one thread unless the user chose.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import example_data  # noqa: E402
import example_utils  # noqa: E402

import htmuon_jax  # noqa: E402

OPTIMIZERS = ("htmuon", "muon", "rmnp", "htnormuon", "htadamuon", "adamw")


class Block(eqx.Module):
  norm1: eqx.nn.LayerNorm
  attn: eqx.nn.MultiheadAttention
  norm2: eqx.nn.LayerNorm
  fc: eqx.nn.Linear
  proj: eqx.nn.Linear

  def __init__(self, dim: int, heads: int, *, key: jax.Array):
    k1, k2, k3 = jax.random.split(key, 3)
    self.norm1 = eqx.nn.LayerNorm(dim)
    self.attn = eqx.nn.MultiheadAttention(heads, dim, key=k1)
    self.norm2 = eqx.nn.LayerNorm(dim)
    self.fc = eqx.nn.Linear(dim, 4 * dim, key=k2)
    self.proj = eqx.nn.Linear(4 * dim, dim, key=k3)

  def __call__(self, x: jax.Array) -> jax.Array:  # x: (seq, dim)
    seq = x.shape[0]
    mask = jnp.tril(jnp.ones((seq, seq), bool))
    h = jax.vmap(self.norm1)(x)
    x = x + self.attn(h, h, h, mask=mask)
    h = jax.vmap(self.norm2)(x)
    return x + jax.vmap(self.proj)(jax.nn.gelu(jax.vmap(self.fc)(h)))


class LM(eqx.Module):
  embed: eqx.nn.Embedding
  pos_embed: jax.Array  # by its name an embedding (as --embeddings says)
  blocks: Any  # a list of Blocks, or one Block of stacked arrays (--scan)
  norm: eqx.nn.LayerNorm
  head: eqx.nn.Linear
  scan: bool = eqx.field(static=True)

  def __init__(
    self,
    vocab: int,
    dim: int,
    layers: int,
    heads: int,
    seq_len: int,
    *,
    scan: bool,
    key: jax.Array,
  ):
    k_emb, k_pos, k_blocks, k_head = jax.random.split(key, 4)
    self.embed = eqx.nn.Embedding(vocab, dim, key=k_emb)
    self.pos_embed = 0.02 * jax.random.normal(k_pos, (seq_len, dim))
    keys = jax.random.split(k_blocks, layers)
    make = lambda k: Block(dim, heads, key=k)
    self.blocks = (
      eqx.filter_vmap(make)(keys) if scan else [make(k) for k in keys]
    )
    self.norm = eqx.nn.LayerNorm(dim)
    self.head = eqx.nn.Linear(dim, vocab, use_bias=False, key=k_head)
    self.scan = scan

  def __call__(self, tokens: jax.Array) -> jax.Array:  # (seq,) -> logits
    x = jax.vmap(self.embed)(tokens) + self.pos_embed[: tokens.shape[0]]
    if self.scan:
      params, static = eqx.partition(self.blocks, eqx.is_array)

      def step(x, p):
        return eqx.combine(p, static)(x), None

      x, _ = jax.lax.scan(step, x, params)
    else:
      for block in self.blocks:
        x = block(x)
    return jax.vmap(self.head)(jax.vmap(self.norm)(x))


def loss_fn(model: LM, batch: jax.Array) -> jax.Array:
  """Next-token cross-entropy (nats per token)."""
  logits = jax.vmap(model)(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), batch[:, 1:]
  ).mean()


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument("--optimizer", default="htmuon", choices=OPTIMIZERS)
  p.add_argument(
    "--lr",
    type=example_utils.learning_rate_flag,
    default=None,
    help="peak learning rate (None: the optimizer's paper value)",
  )
  p.add_argument(
    "--adam-lr",
    type=example_utils.learning_rate_flag,
    default=1e-3,
    help="peak learning rate of the AdamW branch",
  )
  p.add_argument("--weight-decay", type=float, default=0.1)
  p.add_argument(
    "--embeddings",
    default="spectral",
    choices=("spectral", "adamw", "authors"),
    help="the token embedding: a matrix read vocab -> d, AdamW, or a matrix "
    "with fan-out = vocab (the HTMuon authors' reading)",
  )
  p.add_argument(
    "--head",
    default="spectral",
    choices=("spectral", "adamw"),
    help="the LM head: a matrix, or AdamW",
  )
  p.add_argument("--dim", type=example_utils.positive_int_flag, default=64)
  p.add_argument("--layers", type=example_utils.positive_int_flag, default=2)
  p.add_argument("--heads", type=example_utils.positive_int_flag, default=4)
  p.add_argument("--scan", action="store_true", help="stacked blocks, lax.scan")
  p.add_argument("--seq-len", type=example_utils.positive_int_flag, default=64)
  p.add_argument(
    "--batch-size", type=example_utils.positive_int_flag, default=16
  )
  p.add_argument("--steps", type=example_utils.positive_int_flag, default=300)
  p.add_argument(
    "--log-every", type=example_utils.positive_int_flag, default=50
  )
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--max-chars", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  return p


def make_optimizer(args: argparse.Namespace, rules: Any) -> Any:
  lr = (
    args.lr if args.lr is not None else example_utils.default_lr(args.optimizer)
  )
  return example_utils.make_optimizer(
    args.optimizer,
    learning_rate=lr,
    total_steps=args.steps,
    weight_decay=args.weight_decay,
    weight_dimension_numbers=rules,
    adam_lr=args.adam_lr,
  ), lr


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  args = parser().parse_args(argv)
  text = example_data.load_text(max_chars=args.max_chars)
  tok = example_data.Tokenizer.fit(text, "char")
  train_tokens, val_tokens = example_data.split_tokens(tok.encode(text))
  model = LM(
    tok.vocab_size,
    args.dim,
    args.layers,
    args.heads,
    args.seq_len,
    scan=args.scan,
    key=jax.random.key(args.seed),
  )
  rules = htmuon_jax.dimension_rules(embeddings=args.embeddings, head=args.head)
  tx, lr = make_optimizer(args, rules)
  params, static = eqx.partition(model, eqx.is_array)
  print(example_utils.routing_line(args.optimizer, params, rules))
  state = tx.init(params)

  @jax.jit
  def train_step(params, state, batch):
    loss, grads = jax.value_and_grad(
      lambda p: loss_fn(eqx.combine(p, static), batch)
    )(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  eval_loss = jax.jit(lambda p, b: loss_fn(eqx.combine(p, static), b))
  eval_batches = example_data.lm_eval_batches(
    val_tokens, args.eval_batches, args.batch_size, args.seq_len, args.seed
  )
  losses = []
  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    batch = example_data.lm_batch(
      train_tokens, step, args.batch_size, args.seq_len, args.seed
    )
    params, state, loss = train_step(params, state, jnp.asarray(batch))
    losses.append(float(loss))
    if step % args.log_every == 0 or step == args.steps:
      print(f"step {step}/{args.steps}  loss {losses[-1]:.4f}", flush=True)
  seconds = time.perf_counter() - start
  val = float(
    np.mean([eval_loss(params, jnp.asarray(b)) for b in eval_batches])
  )
  print(
    f"{args.optimizer}: final train loss {losses[-1]:.4f}, val loss {val:.4f}, "
    f"{1e3 * seconds / args.steps:.1f} ms/step"
  )
  return dict(
    losses=losses,
    final_train_loss=losses[-1],
    final_val_loss=val,
    lr=lr,
    model=eqx.combine(params, static),
    rules=rules,
  )


if __name__ == "__main__":
  main()
