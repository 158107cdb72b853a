"""Train a small Flax Linen CNN with HTMuon, Muon, AdamW, ... (train_state loop).

The Linen counterpart of the NNX examples: `model.init` gives the parameter
dict, `flax.training.train_state.TrainState` holds parameters and optimizer
state, `state.apply_gradients` applies the optax update. The data is
scikit-learn's 8x8 handwritten digits (offline).

Conv kernels `(h, w, in, out)` are 4-D, so the package's default routing
sends them to AdamW; `--routing flax` (the default here) uses
`htmuon_jax.flax_dimension_numbers`, which makes each conv
kernel one `(h * w * in, out)` matrix. The first line printed says which
leaves went where.

    python examples/train_linen.py --optimizer htmuon --steps 200
    python examples/train_linen.py --optimizer htmuon --routing default

One BLAS thread unless `OPENBLAS_NUM_THREADS` is set.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional, Sequence

# Before numpy / jax load OpenBLAS: one thread unless the user chose.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from htmuon_jax import flax_dimension_numbers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import example_data  # noqa: E402
import example_utils  # noqa: E402

ROUTINGS = {"flax": flax_dimension_numbers, "default": None}


class CNN(nn.Module):
  """Two 3x3 convolutions (the second with stride 2), mean pool, a head."""

  widths: Sequence[int] = (16, 32)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, width in enumerate(self.widths):
      x = nn.relu(nn.Conv(width, (3, 3), strides=1 if i == 0 else 2)(x))
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def parser() -> argparse.ArgumentParser:
  p = example_utils.new_parser(__doc__)
  example_utils.add_optimizer_flags(p)
  p.add_argument(
    "--routing",
    default="flax",
    choices=tuple(ROUTINGS),
    help="flax: flax_dimension_numbers (conv kernels are "
    "matrices); the other choice: the package's own routing "
    "(2-D leaves only)",
  )
  p.add_argument(
    "--widths",
    type=example_utils.widths_flag,
    default="16,32",
    help="channels of the two convolutions, comma-separated",
  )
  p.add_argument(
    "--batch-size",
    type=example_utils.positive_int_flag,
    default=64,
    help="images per batch",
  )
  p.add_argument(
    "--max-examples",
    type=int,
    default=None,
    help="use at most this many training (and validation) "
    "examples (default: all)",
  )
  p.add_argument(
    "--steps",
    type=example_utils.positive_int_flag,
    default=200,
    help="training steps (the learning-rate schedule spans them)",
  )
  p.add_argument(
    "--eval-every",
    type=int,
    default=50,
    help="validation period in steps (0: only at the end)",
  )
  p.add_argument(
    "--log-every",
    type=int,
    default=10,
    help="a progress line (loss, val loss, throughput) every N steps",
  )
  p.add_argument(
    "--seed",
    type=int,
    default=0,
    help="seed of the initialization and of the batches",
  )
  p.add_argument(
    "--metrics-json", default=None, help="write the metrics to this JSON file"
  )
  p.add_argument(
    "--no-progress",
    action="store_true",
    help="accepted as in the other scripts; this one prints progress lines "
    "only, no bar",
  )
  return p


def main(
  argv: Optional[list[str]] = None, *, ignored_flags: str = "error"
) -> dict[str, Any]:
  """Runs the script; `ignored_flags="warn"` only warns about optimizer
  flags that the chosen optimizer ignores (see `example_utils.parse_args`)."""
  args = example_utils.parse_args(parser(), argv, ignored_flags=ignored_flags)
  data = example_data.load_images(
    max_examples=args.max_examples, seed=args.seed
  )
  model = CNN(tuple(int(w) for w in args.widths.split(",")), data.num_classes)
  params = model.init(jax.random.key(args.seed), data.train_x[:1])["params"]
  dims = ROUTINGS[args.routing]
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
  )
  print(example_utils.routing_line(args.optimizer, params, dims))
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=tx
  )

  def loss_and_accuracy(params, x, y):
    logits = state.apply_fn({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  @jax.jit
  def train_step(state: train_state.TrainState, x, y):
    (loss, _), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(
      state.params, x, y
    )
    return state.apply_gradients(grads=grads), loss

  evaluate = jax.jit(loss_and_accuracy)

  def validation(step: int) -> dict[str, Any]:
    loss, accuracy = evaluate(state.params, data.val_x, data.val_y)
    return {"step": step, "loss": float(loss), "accuracy": float(accuracy)}

  history: dict[str, Any] = {"train": [], "val": []}
  timed, seconds = 0, 0.0
  for step in range(1, args.steps + 1):
    x, y = example_data.image_batch(data, step, args.batch_size, args.seed)
    t0 = time.perf_counter()
    state, loss = train_step(state, x, y)
    if step > 1:  # The first step includes compilation.
      loss.block_until_ready()
      seconds += time.perf_counter() - t0
      timed += 1
    if step == args.steps or (args.eval_every and step % args.eval_every == 0):
      history["val"].append(validation(step))
    if step % args.log_every == 0 or step == args.steps:
      history["train"].append({"step": step, "loss": float(loss)})
      print(
        example_utils.progress_line(
          step,
          args.steps,
          float(loss),
          history["val"][-1] if history["val"] else None,
          args.batch_size * timed / seconds if seconds else 0,
          "examples",
        ),
        flush=True,
      )
  per_step = seconds / timed if timed else float("nan")
  final = history["val"][-1]
  history.update(
    {
      "time_per_step_s": per_step,
      "examples_per_s": args.batch_size / per_step if timed else float("nan"),
      "final_train_loss": history["train"][-1]["loss"],
      "final_val_loss": final["loss"],
      "final_val_accuracy": final["accuracy"],
      "config": {**vars(args), "lr": lr},
      "params": state.params,
    }
  )
  example_utils.write_json(args.metrics_json, history)
  routed = (
    f" (routing {args.routing})"
    if example_utils.OPTIMIZERS[args.optimizer].routes
    else ""
  )
  print(
    f"{args.optimizer}{routed}: final train loss "
    f"{history['final_train_loss']:.4f}, val loss {final['loss']:.4f}, "
    f"val accuracy {final['accuracy']:.3f}, {1e3 * per_step:.1f} ms/step"
  )
  return history


if __name__ == "__main__":
  example_utils.run(main)
