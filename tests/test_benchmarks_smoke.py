"""The benchmark scripts run end to end in their --quick configuration."""

import importlib.util
import json
import math
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
  spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_spectral_power_quick(tmp_path):
  out = tmp_path / "sp.json"
  _load("spectral_power").main(["--quick", "--out", str(out)])
  rows = json.loads(out.read_text())["rows"]
  by = {r["method"]: r for r in rows}
  # What the tables claim: the exact methods are accurate, the authors' NS
  # variant is approximate (NS5's band around 1).
  assert by["polynomial"]["rel_err"] < 1e-3 and by["svd"]["rel_err"] < 1e-5
  assert by["authors_ns"]["rel_err"] > 10 * by["polynomial"]["rel_err"]
  assert out.with_suffix(".md").read_text().startswith("p = 0.125")


def test_optimizer_step_quick(tmp_path):
  out = tmp_path / "os.json"
  _load("optimizer_step").main(["--quick", "--out", str(out)])
  rows = json.loads(out.read_text())["rows"]
  # The ratios are relative to the optax baseline row of the same model.
  base = {
    r["model"]: r["time_ms"]
    for r in rows
    if r["optimizer"] == "optax.contrib.muon"
  }
  for r in rows:
    assert r["ratio_to_optax_muon"] == pytest.approx(
      r["time_ms"] / base[r["model"]], rel=1e-3
    )


def test_compile_cost_small_trees(tmp_path):
  out = tmp_path / "cc.json"
  cc = _load("compile_cost")
  common = ["--shapes", "tiny", "--layouts", "unstacked", "--out", str(out)]
  cc.main(common + ["--layers", "2", "4", "--optimizers", "htmuon svd"])
  cc.main(
    common
    + ["--layers", "2", "--optimizers", "optax.contrib.muon"]
    + ["--merge"]
  )
  rows = json.loads(out.read_text())["rows"]
  got = {(r["layers"], r["optimizer"]): r for r in rows}
  assert set(got) == {
    (2, "htmuon svd"),
    (4, "htmuon svd"),
    (2, "optax.contrib.muon"),
  }
  # One program per shape group: twice the layers, the same dots.
  assert got[4, "htmuon svd"]["dots"] == got[2, "htmuon svd"]["dots"]
  assert out.with_suffix(".md").read_text().count("| tiny |") == 3
  with pytest.raises(SystemExit):
    cc.main(common + ["--optimizers", "adam"])


@pytest.mark.multidevice
def test_sharded_step_small(tmp_path):
  # Its own process: the script forces 8 CPU devices before importing JAX.
  import subprocess
  import sys

  out = tmp_path / "ss.json"
  proc = subprocess.run(
    [
      sys.executable,
      str(BENCH / "sharded_step.py"),
      "--reps",
      "1",
      "--layers",
      "2",
      "--vocab",
      "512",
      # One method: the script's loop is the same for each (the stateless
      # methods' distributed collectives are tested in sharding_cases.py).
      "--methods",
      "stream",
      "--tables",
      "timing",
      "memory",
      "--aliases",
      "htadamuon",
      "--memory-methods",
      "stream",
      "--out",
      str(out),
    ],
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  result = json.loads(out.read_text())
  rows = result["rows"]
  # Memory: the largest state (momentum, AdaMuon's moment, the full-rank
  # bases) takes 1/8 per device, to within the replicated norms' AdamW
  # moments (1%), and the distributed step gathers none of it.
  (mem,) = result["memory"]
  assert mem["devices"] == 8, mem
  assert (
    mem["state_bytes_per_device"] <= mem["state_bytes_unsharded"] / 8 * 1.01
  ), mem
  assert mem["collectives"]["all-gather"] == 0, mem
  assert [(r["method"], r["mode"]) for r in rows] == [
    ("stream", "naive"),
    ("stream", "distributed"),
  ]
  for r in rows:
    assert r["step_s_median"] > 0
    assert not any(r["collectives_in_loop"].values()), r
    if r["mode"] == "distributed":
      assert r["collectives"]["all-to-all"] > 0, r


def test_optax_parity_quick(tmp_path):
  out = tmp_path / "op.json"
  _load("optax_parity").main(["--quick", "--out", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert len(rows) == 2 and all(r["adamw_bitwise"] for r in rows)
  # Norm >= 1 (eps = 1e-8 negligible): fp32 round-off through 5
  # Newton-Schulz steps (slope 3.4445 each).
  assert [
    r["matrix_max_rel_diff"] < 3.4445**5 * 2**-24
    for r in rows
    if r["scale"] >= 1
  ] == [True]


def test_accelerator_cost_quick(tmp_path):
  out = tmp_path / "ac.json"
  rows = _load("accelerator_cost").main(["--quick", "--out", str(out)])["rows"]
  by = {r["method"]: r for r in rows}
  base = by["optax muon NS5 (baseline)"]
  assert base["h100_ratio"] == pytest.approx(1.0)
  # Same iteration as optax at the same precision: the same estimate.
  assert by["newton_schulz accurate"]["h100_ratio"] == pytest.approx(1.0)
  assert by["polynomial fast"]["bf16_share"] >= 0.8
  assert by["polynomial accurate"]["bf16_share"] == 0.0
  assert json.loads(out.read_text())["rows"]


def test_accelerator_cost_reads_loops_and_calls():
  # A fori_loop of 7 products inside a called (jitted) function: the parser
  # must multiply the body's dot by the trip count.
  import jax
  import jax.numpy as jnp

  ac = _load("accelerator_cost")

  @jax.jit
  def inner(x):
    return jax.lax.fori_loop(0, 7, lambda i, y: y @ x, x)

  x = jax.ShapeDtypeStruct((16, 16), jnp.float32)
  text = (
    jax.jit(lambda a: inner(a) @ a).lower(x).compiler_ir("hlo").as_hlo_text()
  )
  est = ac.estimate(ac.dots(ac.parse_hlo(text)))
  assert est["dots"] == 2  # Two dot instructions, the first one run 7 times.
  assert est["gflop"] == pytest.approx(8 * 2 * 16**3 / 1e9)


def test_method_quality_quick(tmp_path):
  out = tmp_path / "mq.json"
  payload = _load("method_quality").main(
    [
      "--quick",
      "--configs",
      "htmuon polynomial fast",
      "adamw",
      "--out",
      str(out),
    ]
  )
  # Both configurations train to a finite validation loss, none fails.
  assert not payload["failures"]
  assert len(payload["rows"]) == 2
  assert all(math.isfinite(r["val_loss"]) for r in payload["rows"])
  assert json.loads(out.read_text())["summary"]


def test_fast_precision_quick(tmp_path):
  out = tmp_path / "fp.json"
  payload = _load("fast_precision").main(["--quick", "--out", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert len(rows) == 4 and payload["max_ratio"] == max(
    r["ratio"] for r in rows
  )
  for r in rows:
    # The floor is real bf16 rounding (u = 2^-8 per entry) and the fast
    # setting meets its 2x-floor target; accurate is the 1e-4 contract.
    assert 1e-4 < r["floor"] < 0.1 and r["fast"] < 2 * r["floor"]
    assert r["accurate"] < 1e-4


@pytest.mark.multidevice
def test_mesh_compile_small(tmp_path):
  # Its own process: the script forces 8 CPU devices before importing JAX.
  import subprocess
  import sys

  out = tmp_path / "mc.json"
  common = [sys.executable, str(BENCH / "mesh_compile.py"), "--out", str(out)]
  args = ["--layers", "1", "2", "--layouts", "fsdp", "--axes", "explicit"]
  for extra in (
    ["--optimizers", "htmuon shapes", "optax.contrib.muon"],
    ["--optimizers", "htmuon per leaf", "--layers", "2", "--merge"],
  ):
    proc = subprocess.run(
      common + args + extra,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
  rows = json.loads(out.read_text())["rows"]
  got = {(r["optimizer"], r["layers"]): r for r in rows}
  assert set(got) == {
    ("htmuon shapes", 1),
    ("htmuon shapes", 2),
    ("optax.contrib.muon", 1),
    ("optax.contrib.muon", 2),
    ("htmuon per leaf", 2),
  }
  # optax's muon fails under explicit axes; the error is recorded.
  assert got["optax.contrib.muon", 2]["error"].startswith("ShardingTypeError")
  # One traced chain per group: a second layer adds a few slices, where
  # per leaf it adds a copy of the whole chain.
  grouped = got["htmuon shapes", 2]["lines"] - got["htmuon shapes", 1]["lines"]
  per_leaf = got["htmuon per leaf", 2]["lines"]
  assert grouped < per_leaf / 20, (grouped, per_leaf)
  assert got["htmuon shapes", 2]["remat_warnings"] == 0
  table = out.with_suffix(".md").read_text()
  assert (
    "| fsdp | explicit | optax.contrib.muon | fails: ShardingTypeError" in table
  )
