"""The committed main-job results (docs/main_job/) still describe the code.

`bash scripts/main.sh --out-dir docs/main_job --no-progress` wrote them;
docs/results.md (linked from the README) and docs/main_job/ show their
table. These checks fail when the committed results no longer match what
that command would run now: another default configuration (model, data,
schedule, learning rates, any flag of the training script), or optimizers
whose updates changed (a fingerprint of each optimizer, stored with the
results, is recomputed). Then rerun the command above and commit its output.
"""

import json
import pathlib
import sys

import numpy as np
import pytest

import flax  # noqa: F401

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "main_job"
COMMAND = "python examples/compare.py --out-dir docs/main_job --no-progress"
RERUN = (
  "the committed main-job results are stale: rerun `bash scripts/main.sh "
  "--out-dir docs/main_job --no-progress` and commit docs/main_job/ (and "
  "the table of docs/results.md)"
)

sys.path.insert(0, str(ROOT / "examples"))
import compare  # noqa: E402
import example_utils  # noqa: E402


@pytest.fixture(scope="module")
def results():
  return json.loads((OUT / "results.json").read_text())


def test_results_carry_their_provenance(results):
  made_by = results["provenance"]
  assert made_by["command"] == COMMAND, made_by["command"]
  for key in ("date", "htmuon_jax", "git_commit", "jax", "backend"):
    assert made_by.get(key), key
  assert set(made_by["optimizer_fingerprints"]) == {
    r["optimizer"] for r in results["results"]
  }
  assert [r["optimizer"] for r in results["results"]] == list(
    compare.DEFAULT_OPTIMIZERS
  )
  assert not results.get("failed")


def expected_config(argv, name, metrics_json):
  """The training script's arguments that `compare.py argv` uses for `name`."""
  args, extra = compare.parser().parse_known_args(argv)
  extra = compare._with_alpha_every(args.task, extra, args.alpha_xmin)
  script_args = (
    compare._script(args.task)
    .parser()
    .parse_args(["--optimizer", name, "--metrics-json", metrics_json, *extra])
  )
  config = vars(script_args)
  if config["lr"] is None:
    config["lr"] = example_utils.default_lr(name)
  return config


@pytest.mark.parametrize("name", compare.DEFAULT_OPTIMIZERS)
def test_configuration_matches_the_code_defaults(results, name):
  metrics = json.loads((OUT / f"metrics_{name}.json").read_text())
  committed = metrics["config"]
  expected = expected_config(
    results["argv"], name, committed.get("metrics_json")
  )
  missing = object()
  differences = {
    key: (committed.get(key, "<not in the results>"), value)
    for key, value in expected.items()
    if committed.get(key, missing) != value
  }
  assert not differences, f"{RERUN}; (committed, now): {differences}"
  row = next(r for r in results["results"] if r["optimizer"] == name)
  assert row["lr"] == expected["lr"], RERUN


@pytest.mark.parametrize("name", compare.DEFAULT_OPTIMIZERS)
def test_optimizer_updates_match_the_fingerprint(results, name):
  import jax

  made_on = results["provenance"]["backend"]
  if jax.default_backend() != made_on:
    # method="auto" picks another method on another backend.
    pytest.skip(f"the committed results were made on {made_on}")
  stored = results["provenance"]["optimizer_fingerprints"][name]
  now = compare.optimizer_fingerprint(name)
  np.testing.assert_allclose(now, stored, rtol=1e-4, err_msg=RERUN)


def test_tables_show_the_committed_results(results):
  table = compare.results_table(results["results"])
  assert (OUT / "results.md").read_text() == table + "\n"
  page = (ROOT / "docs" / "results.md").read_text()
  for line in table.splitlines()[2:]:
    assert line in page, f"docs/results.md lacks the committed row {line!r}"
  assert results["provenance"]["git_commit"][:12] in page
