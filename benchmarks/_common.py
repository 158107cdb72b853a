"""Shared helpers of the benchmark scripts: timing, machine description."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import time

import jax
import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def time_fn(fn, *args, repeats: int = 3, warmup: int = 1) -> float:
  """Median wall time (s) of `fn(*args)` after `warmup` calls (compile)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def machine() -> dict:
  """What the numbers were measured on."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {
    "backend": jax.default_backend(),
    "devices": [d.device_kind for d in jax.devices()],
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    "jax": jax.__version__,
    "numpy": np.__version__,
    "python": platform.python_version(),
  }


def write(name: str, payload: dict, markdown: str, out: str | None) -> None:
  """Writes `<name>.json` and `<name>.md` (or to `out`) and prints the table."""
  path = pathlib.Path(out) if out else RESULTS / f"{name}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=1))
  path.with_suffix(".md").write_text(markdown + "\n")
  print(markdown)
  print(f"\nwrote {path} and {path.with_suffix('.md')}")
