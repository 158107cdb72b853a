"""The example scripts on a device mesh (`--mesh`, issue 32).

Each mesh case of `tests/examples_mesh_cases.py` runs in its own subprocess
with 8 forced CPU devices (the flag must be set before JAX is imported): a
run on `--mesh data=2,fsdp=4` (explicit and auto axes, with and without
`--distribute`) equals the one-device run to round-off, and a checkpoint
saved on 8 devices resumes on 4. The two-process case runs `train_lm.py`
itself under `jax.distributed.initialize` (2 processes on localhost, 4 CPU
devices each, gloo collectives): it trains, checkpoints, resumes, and its
losses equal the one-device run's.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.multidevice import run_cases_on_8_cpu_devices

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import example_mesh  # noqa: E402
import train_lm  # noqa: E402

CASES = "examples_mesh_cases.py"


@pytest.mark.multidevice
@pytest.mark.slow
def test_lm_on_a_mesh_equals_one_device():
  run_cases_on_8_cpu_devices(
    f"{CASES}::test_lm_mesh_equals_one_device", timeout=300
  )


@pytest.mark.multidevice
def test_tensor_axis_on_a_mesh_equals_one_device():
  run_cases_on_8_cpu_devices(
    f"{CASES}::test_lm_tensor_axis_equals_one_device", timeout=300
  )


@pytest.mark.multidevice
def test_resnet_on_a_mesh_equals_one_device():
  run_cases_on_8_cpu_devices(
    f"{CASES}::test_resnet_mesh_equals_one_device", timeout=300
  )


@pytest.mark.multidevice
def test_checkpoint_of_8_devices_resumes_on_4():
  run_cases_on_8_cpu_devices(
    f"{CASES}::test_checkpoint_of_8_devices_resumes_on_4", timeout=300
  )


TINY = [
  "--optimizer", "htmuon", "--steps", "6", "--log-every", "1",
  "--eval-every", "0", "--dim", "32", "--layers", "1", "--heads", "2",
  "--seq-len", "16", "--batch-size", "8", "--max-chars", "20000",
  "--eval-batches", "1", "--no-progress",
]  # fmt: skip


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS="1")
  # The script's own folder comes first on its path: this checkout's
  # package, not an installed one.
  env["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
  )
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env.pop("PYTEST_XDIST_WORKER", None)
  return env


def _launch(argv: list[str], devices: int) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, str(ROOT / "examples" / "train_lm.py"), *argv],
    env=_env(devices),
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _wait(procs: list[subprocess.Popen], timeout: int = 240) -> list[str]:
  """Every process's output; fails unless all exited 0 in time."""
  logs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=timeout)
      logs.append(out)
  finally:
    for p in procs:  # Bounded: never leave a worker behind.
      if p.poll() is None:
        p.kill()
        p.wait()
  detail = "\n".join(log[-4000:] for log in logs)
  assert all(p.returncode == 0 for p in procs), detail
  return logs


def _losses(path: pathlib.Path) -> list[float]:
  return [r["loss"] for r in json.loads(path.read_text())["train"]]


@pytest.mark.multidevice
@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
  reference = tmp_path / "one_device.json"
  _wait([_launch([*TINY, "--metrics-json", str(reference)], devices=1)])
  ck = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "3"]
  for leg in ("first", "resumed"):
    port = _free_port()
    flags = ["--stop-after", "3"] if leg == "first" else ["--resume"]
    procs = [
      _launch(
        [
          *TINY,
          *ck,
          *flags,
          "--mesh",
          "data=2,fsdp=4",
          "--distribute",
          "--coordinator",
          f"localhost:{port}",
          "--num-processes",
          "2",
          "--process-id",
          str(i),
          "--metrics-json",
          str(tmp_path / f"{leg}{i}.json"),
        ],  # fmt: skip
        devices=4,
      )
      for i in range(2)
    ]
    logs = _wait(procs)
    if leg == "resumed":
      assert all("resumed from step 3 of 6" in log for log in logs), logs[0]
  want = _losses(reference)
  for i in range(2):  # Every process saw the same global losses.
    got = _losses(tmp_path / f"resumed{i}.json")
    np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=f"process {i}")


# In-process checks on one device: the flags and the sharding rule.


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--distribute"], "--distribute: needs --mesh"),
    (["--axis-types", "auto"], "--axis-types auto: needs --mesh"),
    (["--mesh", "data=2,pipe=4"], "AXIS one of data, fsdp, tensor"),
    (["--mesh", "data=0"], "expected a positive size"),
    (["--mesh", "data=2,data=2"], "axis data given twice"),
    (["--mesh", "data=2"], "needs 2 devices, 1 found"),
    (
      ["--mesh", "data=1", "--optimizer", "adamw", "--distribute"],
      "not an htmuon_jax optimizer",
    ),
    (
      ["--mesh", "data=1", "--coordinator", "localhost:1"],
      "give all three",
    ),
  ],
)
def test_mesh_flags_are_checked(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    train_lm.main(["--steps", "1", *argv])
  assert e.value.code == 2
  assert message in capsys.readouterr().err


def test_batch_must_divide_over_the_batch_axes():
  p = train_lm.parser()
  args = p.parse_args(["--mesh", "data=1,fsdp=1", "--batch-size", "3"])
  example_mesh.check_args(p, args)  # 1 shard: any batch.
  args.mesh = (("data", 2), ("fsdp", 2), ("tensor", 2))
  with pytest.raises(SystemExit):  # 4 shards (tensor does not split it).
    example_mesh.check_args(p, args)


@pytest.mark.parametrize(
  "names, shape, sizes, spec",
  [
    # FSDP: the largest axis fsdp divides, the first of equals.
    (
      ("blocks", "0", "mlp", "up", "kernel"),
      (64, 192),
      {"fsdp": 4},
      P(None, "fsdp"),
    ),
    (
      ("blocks", "0", "attn", "q", "kernel"),
      (64, 64),
      {"fsdp": 4},
      P("fsdp", None),
    ),
    (("embed", "embedding"), (86, 32), {"fsdp": 4}, P(None, "fsdp")),
    (("norm", "scale"), (30,), {"fsdp": 4}, P(None)),
    # Tensor (Megatron): column split of q/k/v/gate/up, row split of o/down;
    # then FSDP on what is left.
    (
      ("blocks", "0", "attn", "q", "kernel"),
      (64, 64),
      {"fsdp": 2, "tensor": 2},
      P("fsdp", "tensor"),
    ),
    (
      ("blocks", "0", "mlp", "down", "kernel"),
      (192, 64),
      {"tensor": 2},
      P("tensor", None),
    ),
    (
      ("blocks", "attn", "o", "kernel"),
      (4, 64, 64),
      {"fsdp": 4, "tensor": 2},
      P(None, "tensor", "fsdp"),
    ),
    (("head", "kernel"), (64, 86), {"data": 2, "tensor": 2}, P(None, None)),
  ],
)
def test_param_spec(names, shape, sizes, spec):
  assert example_mesh.param_spec(names, shape, sizes) == spec
