"""Repeats a jitted HTMuon step of a scanned model on one CPU device.

Not collected by the main suite: `tests/test_reliability.py` runs it in a
subprocess under a timeout. jaxlib's batched CPU SVD hung now and then in
such a step (0% CPU, threads waiting in `ParallelBatchMap`; jax 0.10.2, 3
of ~27 runs of seven stacked (2, m, n) kernels) until
`spectral.lapack_per_matrix` ran every CPU batch one matrix at a time.

Usage: python tests/lapack_stress.py REPEATS [METHOD]
"""

import sys

import jax
import jax.numpy as jnp

import htmuon_jax

MDN = htmuon_jax.MuonDimensionNumbers


def main(repeats: int, method: str) -> None:
  assert jax.device_count() == 1, jax.devices()
  shapes = [(2, 32 + 8 * i, 48) for i in range(7)]  # seven stacked kernels
  keys = jax.random.split(jax.random.key(0), len(shapes))
  params = {
    f"layer{i}": {"kernel": jax.random.normal(k, s)}
    for i, (k, s) in enumerate(zip(keys, shapes))
  }
  dims = jax.tree.map(lambda _: MDN(1, 2), params)
  opt = htmuon_jax.htmuon(
    0.01, method=method, muon_weight_dimension_numbers=dims
  )
  state = opt.init(params)

  @jax.jit
  def step(params, state, key):
    grads = jax.tree.map(
      lambda p: jax.random.normal(key, p.shape, p.dtype), params
    )
    updates, state = opt.update(grads, state, params)
    return jax.tree.map(jnp.add, params, updates), state

  for i in range(repeats):
    params, state = step(params, state, jax.random.key(i))
    jax.block_until_ready(params)
    print(f"step {i} done", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "svd")
