"""Smoke and behaviour tests of the example scripts, with tiny flags.

The scripts run in-process (`main(argv)`), and a persistent compilation cache
makes repeated runs of the same tiny model cheap.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import htmuon_jax

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")
sys.path.insert(0, EXAMPLES)

import compare  # noqa: E402
import example_data  # noqa: E402
import example_utils  # noqa: E402
import train_linen  # noqa: E402
import train_lm  # noqa: E402
import train_resnet  # noqa: E402

SCRIPTS = (train_lm, train_resnet, train_linen)

TINY_LM = [
  "--dim",
  "16",
  "--layers",
  "2",
  "--heads",
  "2",
  "--seq-len",
  "16",
  "--batch-size",
  "2",
  "--steps",
  "6",
  "--eval-every",
  "3",
  "--eval-batches",
  "1",
  "--log-every",
  "1",
  "--tokenizer",
  "byte",
  "--no-progress",
]
TINY_RESNET = [
  "--widths",
  "4,8",
  "--batch-size",
  "8",
  "--steps",
  "3",
  "--eval-every",
  "0",
  "--log-every",
  "1",
  "--max-examples",
  "64",
  "--no-progress",
]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Caches compiled steps on disk while this module runs (then restores)."""
  from jax._src import compilation_cache as cc

  names = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(names[1], 0)
  jax.config.update(names[2], 0)
  cc.reset_cache()
  yield
  for n, v in old.items():
    jax.config.update(n, v)
  cc.reset_cache()


def test_lm_trains_and_writes_metrics(tmp_path, capsys):
  path = tmp_path / "m.json"
  result = train_lm.main(
    TINY_LM
    + ["--optimizer", "htmuon", "--method", "svd", "--metrics-json", str(path)]
  )
  metrics = json.loads(path.read_text())
  assert [p["step"] for p in metrics["train"]] == [1, 2, 3, 4, 5, 6]
  assert [p["step"] for p in metrics["val"]] == [3, 6]
  assert np.isfinite(metrics["final_val_loss"])
  assert metrics["tokens_per_s"] > 0
  # A byte-level model starts near log(256) and goes down.
  vocab = metrics["config"]["vocab_size"]
  assert metrics["train"][0]["loss"] == pytest.approx(np.log(vocab), rel=0.2)
  assert metrics["train"][-1]["loss"] < metrics["train"][0]["loss"]
  assert result["config"]["lr"] == example_utils.OPTIMIZERS["htmuon"].paper_lr
  out = capsys.readouterr().out.splitlines()
  # First the routing: 2 layers x 7 kernels + embedding + head are matrices,
  # 2 x 2 block norms + the final norm go to AdamW.
  assert out[0].startswith(
    "routing: 16 matrices in 16 leaves to the spectral "
    "branch, 5 leaves to AdamW (1-D: 5"
  )
  # Then one progress line per --log-every step, with the latest val loss.
  lines = [l for l in out if l.startswith("step ")]
  assert [l.split()[1] for l in lines] == [f"{s}/6" for s in range(1, 7)]
  val3 = f"val {metrics['val'][0]['loss']:.4f}"
  assert lines[1].split("  ")[2] == "val -"
  assert val3 in lines[2] and f"{val3} (step 3)" in lines[3]
  assert lines[-1].endswith("tokens/s") and "loss " in lines[-1]


def test_lm_dimension_numbers_authors_and_conventional_split():
  args = train_lm.parser().parse_args(TINY_LM + ["--scan"])
  _, model, _, _, _, _ = train_lm.build(args)
  from flax import nnx

  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  dims = train_lm.lm_dimension_numbers(params, split="authors", scan=True)
  blocks = dims["blocks"]
  assert params["blocks"]["attn"]["q"]["kernel"].shape == (2, 16, 16)
  assert blocks["attn"]["q"]["kernel"].reduction_axis == 1  # layer axis = batch
  assert (
    blocks["attn_norm"]["scale"] is None
  )  # stacked (L, d) gain: not a matrix
  assert dims["embed"]["embedding"].output_axis == 0  # fan-out = vocab
  assert dims["head"]["kernel"] is not None and dims["norm"]["scale"] is None
  conv = train_lm.lm_dimension_numbers(params, split="conventional", scan=True)
  assert conv["embed"]["embedding"] is None and conv["head"]["kernel"] is None
  assert conv["blocks"]["mlp"]["up"]["kernel"] is not None
  # The package's default routing finds the nnx.scan stack on its own (from
  # the stacked norm gains) and agrees with the path rule on the blocks.
  from htmuon_jax import resolve_dimension_numbers

  default = resolve_dimension_numbers(None, params)
  assert default["blocks"] == blocks
  assert default["head"] == dims["head"] and default["norm"] == dims["norm"]


def test_scan_and_unrolled_models_compute_the_same_function():
  from flax import nnx

  cfg = train_lm.LMConfig(vocab_size=11, dim=16, num_layers=2, num_heads=2)
  unrolled = train_lm.LM(cfg, rngs=nnx.Rngs(0))
  scanned = train_lm.LM(
    train_lm.LMConfig(**{**cfg.__dict__, "scan": True}), rngs=nnx.Rngs(1)
  )
  # Copy the unrolled weights into the stacked layout.
  u = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  s = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  s["blocks"] = jax.tree.map(
    lambda *xs: np.stack(xs), *[u["blocks"][i] for i in range(2)]
  )
  for k in ("embed", "norm", "head"):
    s[k] = u[k]
  nnx.update(scanned, s)
  tokens = np.arange(10).reshape(2, 5) % 11
  # Same float32 ops in the same order, only scanned: agree to fp32 rounding.
  np.testing.assert_allclose(
    np.asarray(scanned(tokens)),
    np.asarray(unrolled(tokens)),
    rtol=1e-5,
    atol=1e-5,
  )


def test_lm_on_tfds_mock_data(tmp_path):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=40):
    # Same flags as test_lm_trains_and_writes_metrics: compiled steps reused.
    # (--download: the mock stands in for the download.)
    result = train_lm.main(
      TINY_LM
      + [
        "--optimizer",
        "htmuon",
        "--method",
        "svd",
        "--dataset",
        "tfds:tiny_shakespeare",
        "--download",
        "--data-dir",
        str(tmp_path),
      ]
    )
  assert result["config"]["vocab_size"] == 256
  assert np.isfinite(result["final_val_loss"])


def test_resnet_on_digits_and_conv_dimension_numbers():
  result = train_resnet.main(
    TINY_RESNET + ["--optimizer", "htmuon", "--method", "svd"]
  )
  assert np.isfinite(result["final_val_loss"])
  assert 0.0 <= result["val"][-1]["accuracy"] <= 1.0
  params = result["params"]
  dims = train_resnet.resnet_dimension_numbers(params)
  assert params["stem"]["kernel"].shape == (3, 3, 1, 4)
  assert dims["stem"]["kernel"] == train_resnet.CONV_DIMS
  assert dims["stem_bn"]["scale"] is None and dims["head"]["bias"] is None


def test_resnet_on_tfds_mock_cifar10():
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=16):
    data = example_data.load_images("tfds:cifar10", download=True)
  assert data.train_x.shape == (16, 32, 32, 3) and data.num_classes == 10
  assert data.train_x.dtype == np.float32 and data.train_y.dtype == np.int32


def test_embedded_datasets_are_offline_and_real():
  text = example_data.load_text()
  assert len(text) > 400_000 and "Python" in text
  tok = example_data.Tokenizer.fit(text[:1000], "char")
  ids = tok.encode(text[:1000])
  assert tok.decode(ids) == text[:1000]
  byte_tok = example_data.Tokenizer.fit("", "byte")
  assert byte_tok.decode(byte_tok.encode("héllo")) == "héllo"
  digits = example_data.load_images()
  assert digits.train_x.shape[1:] == (8, 8, 1) and digits.num_classes == 10
  # Batches depend on (seed, step) only: resumed runs see the same data.
  a = example_data.lm_batch(ids, 5, 3, 8, seed=0)
  np.testing.assert_array_equal(a, example_data.lm_batch(ids, 5, 3, 8, seed=0))
  assert not np.array_equal(a, example_data.lm_batch(ids, 6, 3, 8, seed=0))


@pytest.mark.parametrize("name", list(example_utils.OPTIMIZERS))
def test_every_listed_optimizer_builds_and_steps(name):
  """What --help lists works (normuon / adamuon once crashed)."""
  params = {"w": np.ones((4, 3), np.float32), "b": np.zeros(3, np.float32)}
  grads = {
    "w": np.arange(12.0, dtype=np.float32).reshape(4, 3) / 10,
    "b": np.ones(3, np.float32),
  }
  tx = example_utils.make_optimizer(name, learning_rate=0.1, total_steps=10)
  state = tx.init(params)
  for _ in range(2):  # The schedule is 0 at step 0: take a second step.
    updates, state = tx.update(grads, state, params)
  assert all(
    np.all(np.isfinite(u)) and np.any(u != 0) for u in jax.tree.leaves(updates)
  )


def test_every_alias_of_the_package_is_an_example_optimizer():
  """`--optimizer` offers each entry of the package's one alias list."""
  aliases = {spec.alias for spec in example_utils.OPTIMIZERS.values()}
  for name in htmuon_jax.ALIASES:
    assert f"htmuon_jax.{name}" in aliases, name


def test_bad_optimizer_names_are_refused():
  with pytest.raises(ValueError, match="optimizer"):
    example_utils.make_optimizer("sgd", learning_rate=0.1, total_steps=10)
  with pytest.raises(ValueError, match="power"):
    example_utils.make_optimizer(
      "muon", learning_rate=0.1, total_steps=10, power=0.5
    )
  with pytest.raises(ValueError, match="dataset"):
    example_data.load_text("wikipedia")
  with pytest.raises(SystemExit):
    train_lm.main(["--optimizer", "sgd"])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_help_lists_every_optimizer_and_every_default(script):
  text = script.parser().format_help()
  for name, spec in example_utils.OPTIMIZERS.items():
    assert f"  {name} " in text and spec.alias in text
  assert "OPENBLAS_NUM_THREADS=1" in text
  defaults = vars(script.parser().parse_args([]))
  flat = " ".join(text.split())  # argparse wraps lines
  for dest, value in defaults.items():
    if value is not None and not isinstance(value, bool):
      assert f"(default: {value})" in flat, dest
  assert "(default: False)" not in flat  # a switch's default goes unsaid
  for part in flat.split(" --")[1:]:  # each flag's help shows one default
    assert len(re.findall(r"\(default|default:", part)) <= 1, part


@pytest.mark.parametrize(
  "argv, flag",
  [
    (["--optimizer", "muon", "--power", "0.5"], "--power 0.5"),
    (["--optimizer", "adamw", "--power", "0.3"], "--power 0.3"),
    (["--optimizer", "rmnp", "--method", "svd"], "--method svd"),
    (["--optimizer", "optax_muon", "--method", "svd"], "--method svd"),
    (["--optimizer", "normuon", "--power", "0.2"], "--power 0.2"),
    (["--optimizer", "adamw", "--adam-lr", "0.1"], "--adam-lr 0.1"),
    (["--optimizer", "adamw", "--split", "conventional"], "--split"),
    (["--resume"], "--resume"),
    (["--checkpoint-every", "5"], "--checkpoint-every 5"),
    (["--checkpoint-dir", "d", "--resume", "--overwrite"], "--overwrite"),
    (["--data-dir", "d"], "--data-dir d"),
    (["--download"], "--download"),
  ],
)
def test_flags_that_would_be_ignored_are_refused(argv, flag, capsys):
  with pytest.raises(SystemExit) as e:
    example_utils.parse_args(train_lm.parser(), argv)
  assert e.value.code == 2
  assert f"error: {flag}" in capsys.readouterr().err


def test_ignored_optimizer_flags_only_warn_when_asked(capsys):
  """compare.py passes one set of flags to every optimizer."""
  args = example_utils.parse_args(
    train_lm.parser(),
    ["--optimizer", "adamw", "--power", "0.3", "--split", "conventional"],
    ignored_flags="warn",
  )
  assert args.power is None and args.split == "authors"  # as if not given
  err = capsys.readouterr().err
  assert "warning: --power 0.3: adamw has no exponent" in err
  assert "warning: --split conventional" in err
  with pytest.raises(SystemExit):  # Not an optimizer flag: still an error.
    example_utils.parse_args(
      train_lm.parser(), ["--resume"], ignored_flags="warn"
    )
  with pytest.raises(ValueError, match="ignored_flags"):
    example_utils.parse_args(train_lm.parser(), [], ignored_flags="ignore")


def test_flags_that_apply_are_accepted():
  for argv in (
    ["--optimizer", "htmuon", "--power", "0.5", "--method", "svd"],
    ["--optimizer", "normuon", "--method", "svd"],
    ["--optimizer", "rmnp", "--adam-lr", "0.01"],
    ["--optimizer", "adamw", "--lr", "0.01"],
    ["--dataset", "tfds:x", "--data-dir", "d", "--download"],
  ):
    args = example_utils.parse_args(train_lm.parser(), argv)
    assert args == train_lm.parser().parse_args(argv)


def test_missing_tfds_data_fails_fast_with_one_message(tmp_path):
  """Offline and not prepared: one error line, nothing written (no retries:
  the timeout turns a retrying run into a failure)."""
  import tensorflow_datasets  # noqa: F401

  env = {**os.environ, "HOME": str(tmp_path), "TFDS_DATA_DIR": ""}
  data_dir = tmp_path / "tfds"
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(EXAMPLES, "train_lm.py"),
      "--dataset",
      "tfds:tiny_shakespeare",
      "--data-dir",
      str(data_dir),
      "--steps",
      "1",
      "--no-progress",
    ],
    capture_output=True,
    text=True,
    timeout=180,
    env=env,
  )
  assert proc.returncode == 1, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
  assert len(errors) == 1, proc.stderr
  assert errors[0].startswith(
    f"error: dataset: tfds:tiny_shakespeare is not prepared in {data_dir}"
  )
  assert "--download" in errors[0]
  assert (
    not data_dir.exists() and not (tmp_path / "tensorflow_datasets").exists()
  )


def test_linen_train_state_example_learns(capsys):
  # Default model and batch (about 1 ms a step on CPU); 100 steps reach
  # about 0.8 validation accuracy, chance is 0.1.
  result = train_linen.main(
    ["--steps", "100", "--eval-every", "0", "--log-every", "1"]
  )
  losses = [p["loss"] for p in result["train"]]
  assert len(losses) == 100 and np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
  assert result["final_val_accuracy"] > 0.5
  out = capsys.readouterr().out
  # flax_dimension_numbers: both conv kernels and the head are matrices.
  assert out.startswith("routing: 3 matrices in 3 leaves to the spectral")
  # The default routing would send the conv kernels to AdamW, and says so.
  line = example_utils.routing_line("htmuon", result["params"], None)
  assert "Conv_0/kernel (3, 3, 1, 16)" in line and "Conv_1/kernel" in line


def test_scripts_set_one_blas_thread_before_numpy_loads():
  """Each script sets OPENBLAS_NUM_THREADS (if unset) before any import that
  loads numpy; in a fresh process numpy's OpenBLAS then runs one thread."""
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
  code = (
    "import sys; sys.path.insert(0, sys.argv[1]); import train_linen, "
    "threadpoolctl; print([i['num_threads'] for i in "
    "threadpoolctl.threadpool_info() if i['internal_api'] == 'openblas'])"
  )
  out = subprocess.run(
    [sys.executable, "-c", code, EXAMPLES],
    env=env,
    capture_output=True,
    text=True,
    timeout=180,
    check=True,
  )
  threads = json.loads(out.stdout.strip().splitlines()[-1])
  assert threads and set(threads) == {1}, out.stdout


def test_schedule_is_warmup_then_cosine_to_ten_percent():
  sched = example_utils.warmup_cosine(1.0, 100)
  assert float(sched(0)) == 0.0
  assert float(sched(10)) == pytest.approx(1.0)
  assert float(sched(100)) == pytest.approx(0.1)
  assert float(sched(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)


@pytest.mark.slow
def test_compare_writes_table_and_plots(tmp_path, capsys):
  out = compare.main(
    ["--optimizers", "adamw,htmuon", "--out-dir", str(tmp_path)] + TINY_LM
  )
  assert [r["optimizer"] for r in out["rows"]] == ["adamw", "htmuon"]
  printed = capsys.readouterr().out
  assert "| adamw |" in printed and "| htmuon |" in printed
  for name in (
    "loss_curves.png",
    "alphas.png",
    "results.json",
    "results.md",
    "metrics_adamw.json",
    "metrics_htmuon.json",
  ):
    assert (tmp_path / name).stat().st_size > 0
  saved = json.loads((tmp_path / "results.json").read_text())
  made_by = saved["provenance"]  # what produced the results
  assert made_by["command"].startswith("python examples/compare.py ")
  assert set(made_by["optimizer_fingerprints"]) == {"adamw", "htmuon"}
  assert made_by["htmuon_jax"] and made_by["date"].endswith("UTC")
  rows = saved["results"]
  # 2 layers x 7 kernels + embedding + head.
  assert len(rows[1]["alphas"]["ks"]) == 16
  assert all(np.isfinite(r["alpha_median"]) for r in rows)


def test_compare_keeps_earlier_results_when_an_optimizer_fails(
  tmp_path, monkeypatch
):
  real = compare.run_one

  def run_one(task, name, *args, **kwargs):
    if name == "htmuon":
      raise RuntimeError("boom")
    return real(task, name, *args, **kwargs)

  monkeypatch.setattr(compare, "run_one", run_one)
  out = compare.main(
    ["--optimizers", "adamw,htmuon", "--out-dir", str(tmp_path)] + TINY_LM
  )
  assert [r["optimizer"] for r in out["rows"]] == ["adamw"]
  assert out["failed"] == {"htmuon": "RuntimeError: boom"}
  saved = json.loads((tmp_path / "results.json").read_text())
  assert [r["optimizer"] for r in saved["results"]] == ["adamw"]
  assert "htmuon" in saved["failed"]
  assert "htmuon: RuntimeError: boom" in (tmp_path / "results.md").read_text()
  # The alpha monitor ran every steps // 10 = 1 step (and at step 0).
  assert [a["step"] for a in saved["histories"]["adamw"]["alpha"]] == list(
    range(7)
  )
  for name in ("loss_curves.png", "alphas.png", "alpha_over_training.png"):
    assert (tmp_path / name).stat().st_size > 0


# 2 optimizers x 2 learning rates, seeds 0 (selection) and 1.
SWEEP = (
  [
    "--sweep",
    "--optimizers",
    "adamw,htmuon",
    "--lr-factors",
    "1,2",
    "--sweep-seeds",
    "0,1",
  ]
  + TINY_LM
  + [
    "--steps",
    "4",
    "--eval-every",
    "0",
    "--alpha-every",
    "2",
    "--method",
    "svd",
  ]
)


@pytest.mark.slow
def test_sweep_picks_argmin_and_reports_seed_statistics(tmp_path, capsys):
  out = compare.main(SWEEP + ["--out-dir", str(tmp_path)])
  for name in (
    "sweep.json",
    "sweep.md",
    "lr_sweep.png",
    "loss_curves.png",
    "alpha_over_training.png",
  ):
    assert (tmp_path / name).stat().st_size > 0
  # Recomputed from the training scripts' own per-run metrics files.
  metrics = {}
  for f in (tmp_path / "runs").glob("*_seed*.json"):
    if not f.name.endswith(".record.json"):
      m = json.loads(f.read_text())
      c = m["config"]
      metrics[(c["optimizer"], c["lr"], c["seed"])] = m
  assert len(metrics) == 6  # 2 x 2 at seed 0, then 2 x 1 at seed 1.
  table = (tmp_path / "sweep.md").read_text()
  summary = json.loads((tmp_path / "sweep.json").read_text())["summary"]
  for opt, base in (("adamw", 1e-3), ("htmuon", 3e-2)):
    grid = {
      lr: m["final_val_loss"]
      for (o, lr, s), m in metrics.items()
      if o == opt and s == 0
    }
    assert sorted(grid) == pytest.approx([base, 2 * base])
    best = min(grid, key=grid.get)
    assert summary["chosen_lr"][opt] == best
    seeds = [metrics[(opt, best, s)]["final_val_loss"] for s in (0, 1)]
    mean, std = np.mean(seeds), np.std(seeds, ddof=1)
    row = next(
      r for r in summary["per_lr"] if r["optimizer"] == opt and r["lr"] == best
    )
    np.testing.assert_allclose(
      [row["val_loss_mean"], row["val_loss_std"]], [mean, std], rtol=1e-12
    )
    assert f"| {opt} | {best:g} | 2 | {mean:.4f} ± {std:.4f} |" in table
    assert [a["step"] for a in metrics[(opt, best, 1)]["alpha"]] == [0, 2, 4]
  # The same initialization and batches per seed across optimizers and lrs:
  # the first logged loss (before any update) is the same, per seed.
  first = {}
  for (_, _, seed), m in metrics.items():
    first.setdefault(seed, set()).add(m["train"][0]["loss"])
  assert len(first[0]) == 1 and len(first[1]) == 1 and first[0] != first[1]
  assert "| adamw |" in capsys.readouterr().out
  # Running it again resumes: nothing is trained, the report is rewritten.
  again = compare.main(SWEEP + ["--out-dir", str(tmp_path)])
  assert "resuming: 6 finished runs" in capsys.readouterr().out
  # (As JSON: single-seed stds are NaN, and NaN != NaN.)
  assert json.dumps(again["summary"]) == json.dumps(out["summary"])
  # Another configuration in the same directory is refused.
  with pytest.raises(ValueError, match="out_dir"):
    compare.main(SWEEP + ["--out-dir", str(tmp_path), "--steps", "5"])
