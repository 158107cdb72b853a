"""Runs a file of pytest cases in a subprocess on 8 forced CPU devices.

`XLA_FLAGS=--xla_force_host_platform_device_count=8` must be set before JAX
is imported, and the main suite's xdist workers have already imported JAX
with one device, so multi-device cases live in files not named `test_*`
and run through `run_cases_on_8_cpu_devices`.
"""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


def run_cases_on_8_cpu_devices(
  filename: str, timeout: int = 900, part: tuple[int, int] = (0, 1)
) -> None:
  """Runs `tests/<filename>` with 8 CPU devices; fails unless all passed.

  `part=(i, n)` runs every n-th case from the i-th on (tests/conftest.py),
  so that a long file can run as n subprocesses on xdist's workers.
  """
  env = dict(os.environ)
  env["HTMUON_CASES_PART"] = f"{part[0]}/{part[1]}"
  env["XLA_FLAGS"] = (
    env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("PYTEST_XDIST_WORKER", None)
  cmd = [
    sys.executable,
    "-m",
    "pytest",
    "-q",
    "-p",
    "no:xdist",
    "-p",
    "no:cacheprovider",
    "-W",
    "ignore",
    str(HERE / filename),
  ]
  proc = subprocess.run(
    cmd,
    env=env,
    cwd=HERE.parent,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )
  assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
  summary = proc.stdout.strip().splitlines()[-1]
  # All cases ran: none skipped for lack of devices.
  assert " passed" in summary and "skipped" not in summary, summary
