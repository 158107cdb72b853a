"""Checkpoints of the examples: an interrupted-and-resumed run equals an
uninterrupted one, bit for bit; runs do not mix their checkpoints."""

import os
import shutil
import sys

import jax
import numpy as np
import pytest

import htmuon_jax

sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")
)
import example_checkpoints  # noqa: E402
import train_lm  # noqa: E402
from tests.test_examples import TINY_LM  # noqa: E402
from tests.test_examples import compilation_cache  # noqa: E402,F401

# The tiny model of test_examples (same shapes, so its compiled steps are
# reused from the compilation cache), checkpointed every 3 of its 6 steps.
TINY = TINY_LM + ["--checkpoint-every", "3"]


CASES = [
  pytest.param(["--optimizer", "htmuon", "--method", "svd"], id="htmuon-svd"),
  pytest.param(["--optimizer", "muon", "--scan"], id="muon-ns-scan"),
  pytest.param(
    ["--optimizer", "htmuon", "--method", "stream"], id="htmuon-stream"
  ),
]


def _leaves_equal(a, b):
  return all(
    np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


@pytest.mark.parametrize("flags", CASES)
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, flags):
  full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
  full = train_lm.main(TINY + flags + ["--checkpoint-dir", str(full_dir)])
  # The interruption: a run that stops after step 3 (and saves there)...
  cut = train_lm.main(
    TINY + flags + ["--checkpoint-dir", str(cut_dir), "--stop-after", "3"]
  )
  assert (
    example_checkpoints.Checkpointer(str(cut_dir), every=3).latest_step() == 3
  )
  assert not _leaves_equal(cut["params"], full["params"])
  # ... then continues from its checkpoint to the end.
  resumed = train_lm.main(
    TINY + flags + ["--checkpoint-dir", str(cut_dir), "--resume"]
  )
  assert resumed["start_step"] == 3
  assert _leaves_equal(resumed["params"], full["params"])
  # The optimizer state (momenta, counts, any method state) matches too.
  restored_full = _restore_latest(full_dir)
  restored_resumed = _restore_latest(cut_dir)
  assert int(restored_full["step"]) == int(restored_resumed["step"]) == 6
  assert _leaves_equal(restored_full, restored_resumed)


def _restore_latest(directory):
  """Restores without a template (orbax reads the saved tree's metadata)."""
  ckpt = example_checkpoints.Checkpointer(str(directory), every=1)
  tree = ckpt.restore(None).state
  ckpt.close()
  return tree


def test_checkpointer_saves_on_period_and_restores_structure(tmp_path):
  state = {
    "step": 0,
    "w": np.arange(6.0, dtype=np.float32).reshape(2, 3),
    "opt": htmuon_jax.ScaleByHTMuonState(
      count=np.array(2, np.int32), mu={"w": np.ones((2, 3), np.float32)}
    ),
  }
  ckpt = example_checkpoints.Checkpointer(str(tmp_path), every=2)
  assert not ckpt.save(1, state)
  assert ckpt.save(2, {**state, "step": 2})
  assert ckpt.save(
    3, {**state, "step": 3}, {"config": {"steps": 9}}, force=True
  )
  assert ckpt.latest_step() == 3
  restored, record = ckpt.restore(state)
  assert record == {"config": {"steps": 9}}
  assert isinstance(restored["opt"], htmuon_jax.ScaleByHTMuonState)
  assert int(restored["step"]) == 3
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert (
    example_checkpoints.Checkpointer(str(tmp_path / "empty"), every=1).restore(
      state
    )
    is None
  )
  with pytest.raises(ValueError, match="every"):
    example_checkpoints.Checkpointer(str(tmp_path), every=0)
  assert ckpt.delete_all() == [2, 3] and ckpt.latest_step() is None
  ckpt.close()
  shutil.rmtree(tmp_path)


def test_streaming_basis_survives_a_checkpoint_bit_for_bit(tmp_path):
  """The streaming method's carried `V` is optimizer state: a run restored
  from a checkpoint continues exactly (a plain optax loop, no Flax)."""
  import optax

  tx = optax.chain(
    htmuon_jax.scale_by_htmuon(0.125, method="svd"),  # momentum
    htmuon_jax.scale_by_spectral_power(0.125, method="stream"),  # carries V
    optax.scale(-0.05),
  )
  rng = np.random.default_rng(0)
  targets = [rng.normal(size=(12, 8)).astype(np.float32) for _ in range(6)]
  params = {"w": np.zeros((12, 8), np.float32), "b": np.zeros(8, np.float32)}

  @jax.jit
  def step(params, opt_state, target):
    grads = jax.grad(
      lambda p: jnp_sum_sq(p["w"] - target) + jnp_sum_sq(p["b"] - 1.0)
    )(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def run(state, first, last):
    p, s = state
    for t in range(first, last):
      p, s = step(p, s, targets[t])
    return p, s

  full = run((params, tx.init(params)), 0, 6)
  half = run((params, tx.init(params)), 0, 3)
  ckpt = example_checkpoints.Checkpointer(str(tmp_path), every=3)
  ckpt.save(3, {"params": half[0], "opt_state": half[1]})
  template = {"params": params, "opt_state": tx.init(params)}
  restored = ckpt.restore(template).state
  basis = jax.tree.leaves(restored["opt_state"][1])
  assert basis and not _leaves_equal(
    basis, jax.tree.leaves(template["opt_state"][1])
  )  # V moved away from V_0 and was restored
  resumed = run((restored["params"], restored["opt_state"]), 3, 6)
  assert _leaves_equal(resumed, full)


def jnp_sum_sq(x):
  return (x * x).sum()


def test_runs_never_mix_checkpoints_and_say_what_they_resume(tmp_path, capsys):
  """A fresh run refuses a directory with checkpoints (unless --overwrite), a
  resumed run refuses changed flags, says where it starts, and a finished
  run reports its stored metrics."""
  import example_utils

  flags = TINY + [
    "--optimizer",
    "htmuon",
    "--method",
    "svd",
    "--checkpoint-dir",
    str(tmp_path),
  ]
  cut = train_lm.main(flags + ["--resume", "--stop-after", "3"])
  assert "no checkpoint in" in capsys.readouterr().out
  with pytest.raises(example_utils.UsageError, match="--overwrite"):
    train_lm.main(flags)
  with pytest.raises(
    example_utils.UsageError, match="--steps 6 in the checkpoint, 9 now"
  ):
    train_lm.main(flags + ["--resume", "--steps", "9"])
  resumed = train_lm.main(flags + ["--resume"])
  assert "resumed from step 3 of 6" in capsys.readouterr().out
  # The history of the first part is kept: one record per step.
  assert [p["step"] for p in resumed["train"]] == [1, 2, 3, 4, 5, 6]
  assert resumed["train"][:3] == cut["train"]
  finished = train_lm.main(flags + ["--resume"])
  out = capsys.readouterr().out
  assert "resumed from step 6 of 6" in out and "nothing to train" in out
  assert np.isfinite(finished["final_val_loss"])
  for key in ("final_train_loss", "final_val_loss", "train", "val"):
    assert finished[key] == resumed[key], key
  fresh = train_lm.main(flags + ["--overwrite", "--stop-after", "1"])
  assert "deleted the checkpoints at steps [3, 6]" in capsys.readouterr().out
  assert fresh["start_step"] == 0
  assert example_checkpoints.Checkpointer(
    str(tmp_path), every=1
  ).all_steps() == [1]
