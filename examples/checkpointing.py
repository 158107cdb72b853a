"""Save and restore a training run with orbax-checkpoint.

A checkpoint is one pytree: `{"step": int, "params": ..., "rest": ...,
"opt_state": ...}`. The optimizer state is saved whole, whatever it holds
(momenta, schedule counts, a streaming method's `V`, ...), and restored
against the structure of a freshly initialized state, so a resumed run
continues exactly where the saved one stopped.

Data order must not live in Python state that a checkpoint misses: the
examples draw the batch of step `t` from `(seed, t)` alone.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


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
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves `state` at `step` if `step % every == 0` (or `force`)."""
    if not force and step % self.every:
      return False
    if step in self._manager.all_steps():
      return False
    self._manager.save(step, args=ocp.args.StandardSave(state))
    self._manager.wait_until_finished()
    return True

  def restore(self, template: Any, step: Optional[int] = None) -> Any:
    """Restores the checkpoint at `step` (default: latest) like `template`.

    Args:
      template: a pytree with the structure, shapes and dtypes to restore
        into (e.g. the freshly initialized training state).
      step: which checkpoint; the latest if `None`.

    Returns:
      The restored pytree, or `None` if there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self._manager.close()
