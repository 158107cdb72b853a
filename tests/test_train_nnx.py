"""A Flax NNX model trained with `nnx.Optimizer(model, htmuon(...))` learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import htmuon_jax

from flax import nnx
from sklearn import datasets


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(64, 64, rngs=rngs)
    self.norm = nnx.LayerNorm(64, rngs=rngs)
    self.l2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.gelu(self.norm(self.l1(x))))


def _digits():
  # scikit-learn ships the 8x8 handwritten digits: real data, no download.
  x, y = datasets.load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  rng = np.random.default_rng(0)
  order = rng.permutation(len(x))
  x, y = x[order], y[order].astype(np.int32)
  return (x[:1500], y[:1500]), (x[1500:], y[1500:])


@pytest.mark.parametrize(
  "make_opt",
  [
    lambda: htmuon_jax.htmuon(
      0.02, power=0.125, weight_decay=0.01, adam_learning_rate=3e-3
    ),
    lambda: htmuon_jax.muon(0.02, adam_learning_rate=3e-3),
  ],
  ids=["htmuon", "muon"],
)
def test_nnx_classifier_learns(make_opt):
  (x, y), (xv, yv) = _digits()
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_opt(), wrt=nnx.Param)

  def loss_fn(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(1)
  losses = []
  for _ in range(300):
    idx = rng.integers(0, len(x), 128)
    losses.append(float(train_step(model, optimizer, x[idx], y[idx])))
  assert np.all(np.isfinite(losses))
  start, end = np.mean(losses[:5]), np.mean(losses[-20:])
  assert end < 0.1 * start, (start, end)
  accuracy = float(jnp.mean(jnp.argmax(model(xv), -1) == yv))
  assert accuracy > 0.9, accuracy
