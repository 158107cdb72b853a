"""benchmarks/run_accelerator.sh in smoke mode (tiny shapes, CPU)."""

import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_run_accelerator_smoke(tmp_path):
  env = dict(
    os.environ, HTMUON_ACCEL_SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable
  )
  subprocess.run(
    ["bash", str(ROOT / "benchmarks/run_accelerator.sh")],
    env=env,
    check=True,
    timeout=170,
  )
  assert len(list(tmp_path.iterdir())) <= 8
  v = json.loads((tmp_path / "versions.json").read_text())
  assert {"jax", "jaxlib", "optax", "flax", "device"} <= set(v)
  s = json.loads((tmp_path / "smoke.json").read_text())
  assert s["rows"] and all(r["finite"] for r in s["rows"])
  for name in ("spectral", "step"):
    rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
    assert rows
    for r in rows:
      assert math.isfinite(r["time_s"]) and math.isfinite(r["compile_s"])
  md = subprocess.run(
    [
      sys.executable,
      str(ROOT / "benchmarks/summarize_accelerator.py"),
      tmp_path,
    ],
    check=True,
    capture_output=True,
    text=True,
  ).stdout
  assert "| shapes | method | measured ms" in md and "failed" not in md
