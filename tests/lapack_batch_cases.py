"""Batched LAPACK calls after collectives, on 8 forced CPU devices.

Not collected by the main suite: `tests/test_spectral.py` runs this file in a
subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=8` and a
short timeout. jaxlib's CPU QR/eigh/Cholesky kernels split a batch over the
intra-op thread pool and wait for the pieces; with 8 devices sharing the pool
after an all-reduce (plain GSPMD) or all-to-all (`distribute=`), all of them
waited forever (jax 0.10.2, a batch of two 512 x 256 matrices).
`spectral.lapack_per_matrix` runs such batches one matrix at a time there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import htmuon_jax

if jax.device_count() != 8:
  pytest.skip(
    "needs XLA_FLAGS=--xla_force_host_platform_device_count=8",
    allow_module_level=True,
  )

MDN = htmuon_jax.MuonDimensionNumbers
# Tall 512 x 256 Gaussians: singular values within a factor ~6 of each
# other, so sharded and unsharded runs agree to ~1e-6 (fp32 round-off times
# the condition number); 1e-5 of the largest entry leaves a margin.
RTOL = 1e-5


@pytest.mark.parametrize(
  "method,distributed",
  [
    ("svd", False),
    ("svd", True),
    ("eigh", False),
    ("eigh", True),
    ("stream", False),
    ("stream", True),
    ("stream_cholesky", False),
    ("stream_cholesky", True),
  ],
)
def test_batched_lapack_after_collectives_completes(method, distributed):
  mesh = jax.make_mesh((8,), ("fsdp",))
  x = jax.random.normal(jax.random.key(0), (2, 512, 256), jnp.float32)
  chosen = (
    htmuon_jax.methods.Stream(qr="cholesky")
    if method == "stream_cholesky"
    else method
  )
  make = lambda **kw: htmuon_jax.scale_by_spectral_power(
    0.125,
    method=chosen,
    weight_dimension_numbers=MDN(1, 2),
    **kw,
  )
  opt = make(distribute=mesh if distributed else None)
  state = opt.init(x)
  sharded = jax.device_put(x, NamedSharding(mesh, P(None, "fsdp", None)))
  got, _ = jax.jit(opt.update)(sharded, state)
  want, _ = jax.jit(make().update)(x, make().init(x))
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(
    got, want, rtol=0, atol=RTOL * np.max(np.abs(want))
  )
