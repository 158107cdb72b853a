"""Test helpers shared by several test modules (no package imports)."""

from __future__ import annotations

import numpy as np


def random_tree(
  rng: np.random.Generator,
  shapes: dict[str, tuple[int, ...]],
  scale: float = 1.0,
) -> dict[str, np.ndarray]:
  """`{name: scale * standard normal of shape}` in float32."""
  return {
    k: (scale * rng.standard_normal(s)).astype(np.float32)
    for k, s in shapes.items()
  }


def layered_tree(layers: int, seed: int = 0) -> dict[str, dict]:
  """A small model of `layers` blocks: square, wide and tall kernels and a
  norm scale per block (equal shapes across blocks, as shape groups want)."""
  rng = np.random.default_rng(seed)
  shapes = {"attn": (16, 16), "up": (16, 40), "down": (40, 16), "norm": (16,)}
  return {
    f"layer{i}": {
      k: {"scale" if k == "norm" else "kernel": v}
      for k, v in random_tree(rng, shapes).items()
    }
    for i in range(layers)
  }
