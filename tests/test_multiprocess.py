"""Multi-process (multi-host) jitted htmuon steps on localhost.

The test starts 2 processes with `jax.distributed.initialize` (CPU collectives
over gloo), 2 CPU devices each: a 4-device global mesh. Each process holds
its shards of the global params and gradients, runs a few jitted `htmuon`
steps (plain GSPMD and the distributed spectral step) and process 0 writes
the gathered result; the test compares it with a single-process run.
Run as a script (`--worker`) this file is the worker.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

STEPS = 3
SHAPES = {"w": (16, 32), "v": (4, 16, 16), "b": (32,)}
SPECS = {"w": ("fsdp", None), "v": (None, "fsdp", None), "b": (None,)}


def _data(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()
  }


def _optimizer(distribute=None):
  import htmuon_jax  # pylint: disable=import-outside-toplevel

  mdn = htmuon_jax.MuonDimensionNumbers
  dims = {"w": mdn(), "v": mdn(1, 2), "b": None}
  return htmuon_jax.htmuon(
    0.05,
    method="svd",
    weight_decay=0.1,
    muon_weight_dimension_numbers=dims,
    distribute=distribute,
  )


def _single_process_run() -> dict[str, np.ndarray]:
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  opt = _optimizer()
  params = _data(0)
  state = opt.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for t in range(STEPS):
    params, state = step(params, state, _data(t + 1))
  return jax.tree.map(np.asarray, params)


def _worker(process_id: int, port: int, out_dir: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=f"localhost:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
  )
  import optax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  import htmuon_jax  # pylint: disable=import-outside-toplevel

  assert jax.process_count() == 2 and jax.device_count() == 4
  mesh = jax.make_mesh((4,), ("fsdp",))
  shard = {k: NamedSharding(mesh, P(*s)) for k, s in SPECS.items()}

  def global_array(tree):
    # Each process builds only the shards of its own devices.
    return {
      k: jax.make_array_from_callback(
        v.shape, shard[k], lambda idx, v=v: v[idx]
      )
      for k, v in tree.items()
    }

  results = {}
  for name, distribute in (("naive", None), ("distributed", mesh)):
    opt = _optimizer(distribute)
    params = global_array(_data(0))
    state_shard = htmuon_jax.state_shardings(opt, params)
    state = jax.jit(opt.init, out_shardings=state_shard)(params)

    def step(params, state, grads, opt=opt):
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    step = jax.jit(
      step,
      in_shardings=(shard, state_shard, shard),
      out_shardings=(shard, state_shard),
    )
    for t in range(STEPS):
      params, state = step(params, state, global_array(_data(t + 1)))
    for k, v in multihost_utils.process_allgather(params, tiled=True).items():
      results[f"{name}/{k}"] = np.asarray(v)
  if process_id == 0:
    np.savez(os.path.join(out_dir, "result.npz"), **results)
  jax.distributed.shutdown()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.multidevice
def test_two_processes_match_single_process():
  expected = _single_process_run()
  with tempfile.TemporaryDirectory() as out_dir:
    port = _free_port()
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    procs = [
      subprocess.Popen(
        [sys.executable, __file__, "--worker", str(i), str(port), out_dir],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
      for i in range(2)
    ]
    logs = []
    try:
      for p in procs:
        out, _ = p.communicate(timeout=300)
        logs.append(out)
    finally:
      for p in procs:  # Bounded: never leave a worker behind.
        if p.poll() is None:
          p.kill()
          p.wait()
    detail = "\n".join(log[-4000:] for log in logs)
    assert all(p.returncode == 0 for p in procs), detail
    got = dict(np.load(os.path.join(out_dir, "result.npz")))
  for name in ("naive", "distributed"):
    for k, want in expected.items():
      # fp32: sharded reductions reorder sums; 1e-5 of the largest entry is
      # ~100 ulps (see tests/sharding_cases.py).
      np.testing.assert_allclose(
        got[f"{name}/{k}"],
        want,
        rtol=0,
        atol=1e-5 * np.max(np.abs(want)),
        err_msg=f"{name}/{k}",
      )


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
