"""Helper module of the examples (not a script): orbax checkpoints of a run.

A checkpoint holds two items: the training state, one pytree
`{"step": int, "params": ..., "rest": ..., "opt_state": ...}`, and a small
JSON record of the run (`{"config": ..., "history": ...}`: the flags the run
was started with and the metrics so far). The optimizer state is saved whole,
whatever it holds (momenta, schedule counts, a streaming method's `V`, ...),
and restored against the structure of a freshly initialized state, so a
resumed run continues exactly where the saved one stopped; the record lets a
resumed run check that it is the same run (same `--steps`, optimizer, ...)
and report the metrics of a run that had already finished.

Data order must not live in Python state that a checkpoint misses: the
examples draw the batch of step `t` from `(seed, t)` alone.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import jax
import orbax.checkpoint as ocp

STATE, RECORD = "state", "record"


class Restored(NamedTuple):
  """A restored checkpoint: the training state and the run's JSON record."""

  state: Any
  record: dict[str, Any]


class Checkpointer:
  """Periodic checkpoints of a training state in one directory.

  Args:
    directory: where the step folders go (created if missing).
    every: save every `every` steps (`save` skips other steps unless forced).
    max_to_keep: how many recent checkpoints to keep.
  """

  def __init__(self, directory: str, *, every: int, max_to_keep: int = 2):
    if every < 1:
      raise ValueError(f"every: must be >= 1, got {every}.")
    self.every = every
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True
      ),
    )

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(
    self,
    step: int,
    state: Any,
    record: Optional[dict[str, Any]] = None,
    *,
    force: bool = False,
  ) -> bool:
    """Saves `state` (and `record`) at `step` if `step % every == 0` (or
    `force`).

    Args:
      step: the training step.
      state: the pytree to save.
      record: JSON-serializable facts about the run (its flags, metrics).
      force: save even off the period.

    Returns:
      Whether a checkpoint was written.
    """
    if not force and step % self.every:
      return False
    if step in self._manager.all_steps():
      return False
    self._manager.save(
      step,
      args=ocp.args.Composite(
        **{
          STATE: ocp.args.StandardSave(state),
          RECORD: ocp.args.JsonSave(record or {}),
        }
      ),
    )
    self._manager.wait_until_finished()
    return True

  def restore(
    self, template: Any, step: Optional[int] = None
  ) -> Optional[Restored]:
    """Restores the checkpoint at `step` (default: latest) like `template`.

    Args:
      template: a pytree with the structure, shapes and dtypes to restore
        into (e.g. the freshly initialized training state); `None` reads the
        saved tree as it is (from its metadata).
      step: which checkpoint; the latest if `None`.

    Returns:
      A `Restored(state, record)`, or `None` if there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    state_args = (
      ocp.args.StandardRestore()
      if template is None
      else ocp.args.StandardRestore(
        jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
      )
    )
    out = self._manager.restore(
      step,
      args=ocp.args.Composite(
        **{STATE: state_args, RECORD: ocp.args.JsonRestore()}
      ),
    )
    return Restored(out[STATE], dict(out[RECORD] or {}))

  def delete_all(self) -> list[int]:
    """Deletes every checkpoint in the directory (nothing else in it).

    Returns:
      The deleted steps.
    """
    steps = self.all_steps()
    for step in steps:
      self._manager.delete(step)
    return steps

  def close(self) -> None:
    self._manager.close()
