"""benchmarks/run_accelerator.sh in smoke mode (tiny shapes, CPU), and its
sections' JSON surviving a kill mid-section."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUMMARIZE = ROOT / "benchmarks/summarize_accelerator.py"
# The sections import the package of this checkout, whatever the active
# environment has installed (an editable install of another checkout).
CHECKOUT = {
  "PYTHONPATH": os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
  )
}


def _summary(out_dir) -> str:
  return subprocess.run(
    [sys.executable, str(SUMMARIZE), str(out_dir)],
    check=True,
    capture_output=True,
    text=True,
  ).stdout


@pytest.mark.slow
def test_run_accelerator_smoke(tmp_path):
  env = dict(
    os.environ,
    **CHECKOUT,
    HTMUON_ACCEL_SMOKE="1",
    OUT=str(tmp_path),
    PYTHON=sys.executable,
  )
  subprocess.run(
    ["bash", str(ROOT / "benchmarks/run_accelerator.sh")],
    env=env,
    check=True,
    timeout=650,
  )
  files = sorted(p.name for p in tmp_path.iterdir())
  assert files == [
    f"{s}.json"
    for s in sorted(("versions", "smoke", "spectral", "step", "race"))
  ]
  sections = {p: json.loads((tmp_path / p).read_text()) for p in files}
  assert all(j["complete"] and "error" not in j for j in sections.values())
  v = sections["versions.json"]
  assert {"jax", "jaxlib", "optax", "flax", "device"} <= set(v)
  s = sections["smoke.json"]
  assert s["rows"] and all(r["finite"] for r in s["rows"])
  for name in ("spectral", "step"):
    rows = sections[f"{name}.json"]["rows"]
    assert rows
    for r in rows:
      assert math.isfinite(r["time_s"]) and math.isfinite(r["compile_s"])
  race = sections["race.json"]["rows"]
  finals = [r for r in race if r["final"]]
  assert [r["optimizer"] for r in finals] == [
    "muon (optax.contrib.muon)",
    "htmuon auto",
    "htmuon svd",
  ]
  for r in finals:
    assert r["steps"] > 0 and r["train_s"] >= sections["race.json"]["budget_s"]
    assert math.isfinite(r["val_loss"]) and math.isfinite(r["tokens_per_s"])
  md = _summary(tmp_path)
  assert "| shapes | method | measured ms" in md
  assert "| optimizer | train s | steps | tokens/s" in md
  assert "partial" not in md and "did not start" not in md


# Runs the smoke section with `htmuon(method="svd")` hanging, as a section
# stuck past its budget would.
HANG = """
import sys, time
sys.path.insert(0, {bench!r})
import accelerator_run
import htmuon_jax

real = htmuon_jax.htmuon
def htmuon(*args, method="auto", **kwargs):
  if method == "svd":
    print("hanging", flush=True)
    time.sleep(600)
  return real(*args, method=method, **kwargs)
htmuon_jax.htmuon = htmuon
sys.argv = ["accelerator_run.py", "smoke", {out!r}]
accelerator_run.main()
"""


def test_a_killed_section_keeps_its_finished_rows(tmp_path):
  out = tmp_path / "smoke.json"
  driver = tmp_path / "driver.py"
  driver.write_text(HANG.format(bench=str(ROOT / "benchmarks"), out=str(out)))
  env = dict(os.environ, **CHECKOUT, HTMUON_ACCEL_SMOKE="1")
  proc = subprocess.Popen(
    [sys.executable, str(driver)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  try:
    deadline = time.monotonic() + 240
    for line in proc.stdout:
      if line.startswith("hanging") or time.monotonic() > deadline:
        break
    # What `timeout` sends when a section runs past its budget.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
  finally:
    proc.kill()
  j = json.loads(out.read_text())
  assert not j["complete"]
  # polynomial, newton_schulz and express ran before svd hung.
  assert [r["method"] for r in j["rows"]] == [
    "polynomial",
    "newton_schulz",
    "express",
  ]
  assert {p.name for p in tmp_path.iterdir()} == {"smoke.json", "driver.py"}
  md = _summary(tmp_path)
  assert "(partial: stopped by its time budget; 3 rows kept)" in md
  assert "| polynomial |" in md and "| svd |" not in md


def test_a_failing_section_records_its_error(tmp_path):
  out = tmp_path / "nope.json"
  r = subprocess.run(
    [sys.executable, str(ROOT / "benchmarks/accelerator_run.py"), "nope", out],
    env=dict(os.environ, **CHECKOUT, HTMUON_ACCEL_SMOKE="1"),
    capture_output=True,
    text=True,
  )
  assert r.returncode != 0
  j = json.loads(out.read_text())
  assert not j["complete"] and j["error"].startswith("KeyError")


def test_a_package_that_fails_to_import_is_reported(tmp_path):
  # A newer jax that breaks `import htmuon_jax`: versions still runs and
  # says so; the other sections record the error instead of a bare crash.
  fake = tmp_path / "fake" / "htmuon_jax"
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text("raise ImportError('simulated')\n")
  env = dict(
    os.environ,
    HTMUON_ACCEL_SMOKE="1",
    PYTHONPATH=os.pathsep.join([str(fake.parent), str(ROOT)]),
  )
  run = lambda name: subprocess.run(
    [
      sys.executable,
      str(ROOT / "benchmarks/accelerator_run.py"),
      name,
      str(tmp_path / f"{name}.json"),
    ],
    env=env,
    capture_output=True,
    text=True,
  )
  assert run("versions").returncode == 0
  v = json.loads((tmp_path / "versions.json").read_text())
  assert v["complete"] and "simulated" in v["htmuon_jax"] and v["jax"]
  assert run("smoke").returncode != 0
  s = json.loads((tmp_path / "smoke.json").read_text())
  assert not s["complete"] and "simulated" in s["error"]
  assert "partial: ImportError" in _summary(tmp_path)
