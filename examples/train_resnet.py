"""Train a small ResNet image classifier with HTMuon, Muon, AdamW, ...

Flax NNX ResNet (basic blocks, batch norm). Conv kernels `(h, w, in, out)`
are matrices with fan-in `h * w * in` and fan-out `out`:
`MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)`.

Offline by default on scikit-learn's 8x8 handwritten digits; CIFAR-10 (or any
tfds image-classification dataset) with `--dataset tfds:cifar10`.

    python examples/train_resnet.py --optimizer htmuon --steps 200
    python examples/train_resnet.py --dataset tfds:cifar10 --download \
        --widths 64,128,256 --steps 5000 --batch-size 128
    python examples/train_resnet.py --optimizer htmuon --mesh data=2,fsdp=4

It prints where the parameters went (spectral branch or AdamW), then a line
per `--log-every` steps. One BLAS thread unless `OPENBLAS_NUM_THREADS` is set.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence

# Before numpy / jax load OpenBLAS: one thread unless the user chose.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import optax
from flax import nnx
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

CONV_DIMS = MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)


class BasicBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
    conv = lambda i, o, s: nnx.Conv(
      i, o, (3, 3), strides=s, use_bias=False, rngs=rngs
    )
    self.conv1, self.bn1 = (
      conv(cin, cout, stride),
      nnx.BatchNorm(cout, rngs=rngs),
    )
    self.conv2, self.bn2 = conv(cout, cout, 1), nnx.BatchNorm(cout, rngs=rngs)
    if stride != 1 or cin != cout:
      self.proj = nnx.Conv(
        cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs
      )
      self.proj_bn = nnx.BatchNorm(cout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    # The projection shortcut exists only where the shape changes.
    shortcut = self.proj_bn(self.proj(x)) if hasattr(self, "proj") else x
    return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
  """ResNet: a 3x3 stem, one stage per width (stride 2 after the first)."""

  def __init__(
    self,
    in_channels: int,
    num_classes: int,
    widths: Sequence[int] = (16, 32),
    blocks_per_stage: int = 1,
    *,
    rngs: nnx.Rngs,
  ):
    self.stem = nnx.Conv(
      in_channels, widths[0], (3, 3), use_bias=False, rngs=rngs
    )
    self.stem_bn = nnx.BatchNorm(widths[0], rngs=rngs)
    blocks, cin = [], widths[0]
    for i, w in enumerate(widths):
      for j in range(blocks_per_stage):
        blocks.append(
          BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1, rngs=rngs)
        )
        cin = w
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(cin, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jax.nn.relu(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


def resnet_dimension_numbers(params: Any, *, split: str = "authors") -> Any:
  """Conv kernels and the head are matrices (the head goes to AdamW with
  `split="conventional"`); biases and batch-norm parameters are not."""

  def rule(path, leaf):
    names = example_utils.path_names(path)
    if jnp.ndim(leaf) == 4:
      return CONV_DIMS
    if jnp.ndim(leaf) == 2:
      return (
        None
        if (split == "conventional" and names[0] == "head")
        else (MuonDimensionNumbers())
      )
    return None

  return jax.tree_util.tree_map_with_path(rule, params)


def classification_loss(model: ResNet, batch) -> tuple[jax.Array, dict]:
  x, y = batch
  logits = model(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}


def parser() -> argparse.ArgumentParser:
  p = example_utils.new_parser(__doc__)
  example_utils.add_optimizer_flags(p)
  p.add_argument(
    "--split",
    default="authors",
    choices=("authors", "conventional"),
    help="authors: the head is a matrix too; conventional: it goes to AdamW",
  )
  example_utils.add_dataset_flags(
    p,
    default=example_data.IMAGE_DEFAULT,
    offline="'digits' (offline)",
    example="tfds:cifar10",
  )
  p.add_argument(
    "--max-examples",
    type=int,
    default=None,
    help="use at most this many training (and validation) "
    "examples (default: all)",
  )
  p.add_argument(
    "--widths",
    type=example_utils.widths_flag,
    default="16,32",
    help="channels per stage, comma-separated",
  )
  p.add_argument(
    "--blocks-per-stage", type=int, default=1, help="residual blocks per stage"
  )
  p.add_argument(
    "--batch-size",
    type=example_utils.positive_int_flag,
    default=64,
    help="images per batch",
  )
  example_utils.add_training_flags(p, steps=200, eval_every=50)
  example_mesh.add_mesh_flags(p)
  return p


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
  data = example_data.load_images(
    args.dataset,
    max_examples=args.max_examples,
    seed=args.seed,
    data_dir=args.data_dir,
    download=args.download,
  )
  widths = tuple(int(w) for w in args.widths.split(","))
  model = ResNet(
    data.train_x.shape[-1],
    data.num_classes,
    widths,
    args.blocks_per_stage,
    rngs=nnx.Rngs(args.seed),
  )
  dims = lambda p: resnet_dimension_numbers(p, split=args.split)
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
  print(
    example_utils.routing_line(
      args.optimizer, nnx.to_pure_dict(nnx.state(model, nnx.Param)), dims
    )
  )
  result = example_utils.train(
    model,
    tx,
    loss_fn=classification_loss,
    batch_fn=lambda step: example_data.image_batch(
      data, step, args.batch_size, args.seed
    ),
    eval_batches=example_data.image_eval_batches(data, 256),
    steps=args.steps,
    eval_every=args.eval_every,
    log_every=args.log_every,
    checkpoint_dir=args.checkpoint_dir,
    checkpoint_every=args.checkpoint_every,
    resume=args.resume,
    overwrite=args.overwrite,
    config=example_utils.run_config(args),
    stop_after=args.stop_after,
    items_per_batch=args.batch_size,
    items_name="examples",
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
  result["config"] = {**vars(args), "lr": lr}
  result["model"], result["dimension_numbers"] = model, dims
  example_utils.write_json(
    args.metrics_json,
    {
      k: v for k, v in result.items() if k not in ("model", "dimension_numbers")
    },
  )
  final = result["val"][-1] if result["val"] else {}
  print(
    f"{args.optimizer}: final train loss {result['final_train_loss']:.4f}, "
    f"val loss {final.get('loss', float('nan')):.4f}, "
    f"val accuracy {final.get('accuracy', float('nan')):.3f}, "
    f"{1e3 * result['time_per_step_s']:.1f} ms/step"
  )
  return result


if __name__ == "__main__":
  example_utils.run(main, example_data.DataNotAvailableError)
