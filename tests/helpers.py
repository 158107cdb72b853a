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
