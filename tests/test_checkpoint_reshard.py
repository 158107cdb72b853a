"""Orbax checkpoints of every optimizer state survive a change of mesh.

The cases live in `tests/reshard_checkpoint_cases.py` and run in a
subprocess with 8 forced CPU devices (the flag must be set before JAX is
imported; the main suite's workers have one device).
"""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.multidevice
def test_save_on_4x2_mesh_restore_on_8x1_mesh():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("PYTEST_XDIST_WORKER", None)
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p",
         "no:cacheprovider", "-W", "ignore",
         str(HERE / "reshard_checkpoint_cases.py")]
  proc = subprocess.run(cmd, env=env, cwd=HERE.parent, capture_output=True,
                        text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
  summary = proc.stdout.strip().splitlines()[-1]
  assert " passed" in summary and "skipped" not in summary, summary
