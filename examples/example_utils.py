"""Shared pieces of the examples: optimizers by name, schedule, training loop.

The loop is functional: the model is split once into a graph definition and
pure-dict parameter / other states (`nnx.split`), the jitted step merges them
back, and the optax optimizer sees a plain dict of arrays. That keeps the
dimension-number trees and the orbax checkpoints simple.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import htmuon_jax
from checkpointing import Checkpointer

# Peak learning rates of the paper's LLaMA-60M/135M runs (RMNP: its paper's
# default); other optimizers fall back to DEFAULT_LR.
PAPER_LR = {"adamw": 1e-3, "muon": 1e-2, "optax_muon": 1e-2, "htmuon": 3e-2,
            "rmnp": 2e-2}
DEFAULT_LR = 1e-2
# Optimizers of htmuon_jax that the examples pick up when the package has them.
OPTIONAL_OPTIMIZERS = ("rmnp", "htnormuon", "htadamuon", "normuon", "adamuon")


def available_optimizers() -> list[str]:
  """Names accepted by `make_optimizer` in this installation."""
  names = ["adamw", "muon", "htmuon", "optax_muon"]
  names += [n for n in OPTIONAL_OPTIMIZERS if hasattr(htmuon_jax, n)]
  return names


def default_lr(name: str) -> float:
  return PAPER_LR.get(name, DEFAULT_LR)


def warmup_cosine(peak: float, total_steps: int, *, warmup_fraction: float = 0.1,
                  min_lr_ratio: float = 0.1) -> optax.Schedule:
  """The paper's schedule: linear warmup over 10%, cosine down to 10% of peak."""
  warmup = max(1, int(warmup_fraction * total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=peak * min_lr_ratio)


def make_optimizer(
    name: str,
    *,
    learning_rate: float,
    total_steps: int,
    weight_decay: float = 0.1,
    weight_dimension_numbers: Any = None,
    power: Optional[float] = None,
    method: Optional[str] = None,
    adam_lr: float = 1e-3,
) -> optax.GradientTransformation:
  """Builds an optimizer by name with the paper's schedule and splits.

  Args:
    name: one of `available_optimizers()`.
    learning_rate: peak learning rate of the main (matrix) branch.
    total_steps: length of the warmup + cosine schedule.
    weight_decay: decoupled weight decay of matrices (AdamW: of every 2-D+
      leaf).
    weight_dimension_numbers: which leaves are matrices (a tree or callable,
      see `htmuon_jax.htmuon`); the rest go to AdamW with `adam_lr`.
    power: HTMuon's exponent (optimizers that take one).
    method: spectral method (optimizers that take one).
    adam_lr: peak learning rate of the AdamW branch (the authors: 1e-3,
      betas 0.9 / 0.95, eps 1e-10).

  Returns:
    An `optax.GradientTransformation`.
  """
  if name not in available_optimizers():
    raise ValueError(
        f"optimizer: unknown {name!r}; available: {available_optimizers()}.")
  schedule = warmup_cosine(learning_rate, total_steps)
  adam_schedule = warmup_cosine(adam_lr, total_steps)
  if name == "adamw":
    decay_mask = lambda p: jax.tree.map(lambda x: jnp.ndim(x) >= 2, p)
    return optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8,
                       weight_decay=weight_decay, mask=decay_mask)
  if name == "optax_muon":
    return optax.contrib.muon(
        schedule, weight_decay=weight_decay, adam_b2=0.95,
        adam_learning_rate=adam_schedule,
        muon_weight_dimension_numbers=weight_dimension_numbers)
  factory = getattr(htmuon_jax, name)
  accepted = inspect.signature(factory).parameters
  kwargs = dict(learning_rate=schedule, weight_decay=weight_decay,
                adam_learning_rate=adam_schedule, adam_b2=0.95, eps=1e-10,
                muon_weight_dimension_numbers=weight_dimension_numbers,
                power=power, method=method)
  if "muon_weight_dimension_numbers" not in accepted:
    kwargs["weight_dimension_numbers"] = kwargs.pop(
        "muon_weight_dimension_numbers")
  kwargs = {k: v for k, v in kwargs.items()
            if k in accepted and v is not None}
  return factory(**kwargs)


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """Key path of a pure-dict leaf as strings."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
               for k in path)


def _block(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.block_until_ready() if hasattr(
      x, "block_until_ready") else x, tree)


def train(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    *,
    loss_fn: Callable[[nnx.Module, Any], tuple[jax.Array, dict[str, jax.Array]]],
    batch_fn: Callable[[int], Any],
    eval_batches: Sequence[Any],
    steps: int,
    eval_every: int = 0,
    log_every: int = 10,
    checkpoint_dir: Optional[str] = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    stop_after: Optional[int] = None,
    items_per_batch: int = 1,
    items_name: str = "tokens",
    progress: bool = True,
    desc: str = "train",
) -> dict[str, Any]:
  """Trains `model` in place and returns the metrics.

  Args:
    model: a Flax NNX module (its parameters are `nnx.Param`s).
    tx: the optax optimizer for the pure-dict parameter tree.
    loss_fn: `(model, batch) -> (mean loss, metrics)`; the model is in train
      mode; mutations of non-parameter state (e.g. batch statistics) are kept.
    batch_fn: `step -> batch` for steps `1..steps`.
    eval_batches: fixed validation batches (`loss_fn` in eval mode, averaged).
    steps: total number of steps.
    eval_every: validation period (0: only at the end).
    log_every: how often to record the training loss.
    checkpoint_dir: where to save checkpoints (None: no checkpoints).
    checkpoint_every: checkpoint period; the last step is always saved.
    resume: continue from the latest checkpoint in `checkpoint_dir`.
    stop_after: stop after this step (simulates an interruption; the
      schedule still runs over `steps`).
    items_per_batch: tokens (or examples) per batch, for the throughput.
    items_name: what `items_per_batch` counts.
    progress: show a tqdm progress bar.
    desc: progress bar label.

  Returns:
    `{"train": [{step, loss}], "val": [{step, loss, ...}], "time_per_step_s",
    f"{items_name}_per_s", "final_train_loss", "final_val_loss", "steps",
    "start_step"}`.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  opt_state = tx.init(params)
  state = {"step": 0, "params": params, "rest": rest, "opt_state": opt_state}

  ckpt = None
  if checkpoint_dir:
    ckpt = Checkpointer(checkpoint_dir, every=checkpoint_every or steps)
    if resume:
      restored = ckpt.restore(state)
      if restored is not None:
        state = restored
  start = int(state["step"])

  def merged(params, rest, train_mode):
    m = nnx.merge(graphdef, params, rest)
    m.train() if train_mode else m.eval()
    return m

  @jax.jit
  def train_step(params, rest, opt_state, batch):
    def loss_of(p):
      m = merged(p, rest, True)
      loss, metrics = loss_fn(m, batch)
      new_rest = nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))
      return loss, (metrics, new_rest)

    (loss, (metrics, new_rest)), grads = jax.value_and_grad(
        loss_of, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, new_rest, opt_state, loss, metrics

  @jax.jit
  def eval_step(params, rest, batch):
    return loss_fn(merged(params, rest, False), batch)

  def evaluate(params, rest):
    # Weighted by batch size: the last batch may be smaller.
    totals: dict[str, float] = {}
    count = 0
    for batch in eval_batches:
      n = len(jax.tree.leaves(batch)[0])
      loss, metrics = eval_step(params, rest, batch)
      for k, v in {"loss": loss, **metrics}.items():
        totals[k] = totals.get(k, 0.0) + n * float(v)
      count += n
    return {k: v / max(1, count) for k, v in totals.items()}

  end = steps if stop_after is None else min(steps, stop_after)
  history: dict[str, Any] = {"train": [], "val": [], "start_step": start,
                             "steps": steps}
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=steps, initial=start, desc=desc, leave=False,
               dynamic_ncols=True)
  params, rest, opt_state = state["params"], state["rest"], state["opt_state"]
  timed_steps, timed_seconds, loss = 0, 0.0, None
  for step in range(start + 1, end + 1):
    batch = batch_fn(step)
    t0 = time.perf_counter()
    params, rest, opt_state, loss, _ = train_step(params, rest, opt_state,
                                                  batch)
    if step > start + 1:  # The first step includes compilation.
      loss.block_until_ready()
      timed_seconds += time.perf_counter() - t0
      timed_steps += 1
    if step % log_every == 0 or step == end:
      history["train"].append({"step": step, "loss": float(loss)})
    if eval_every and step % eval_every == 0 and step != end:
      history["val"].append({"step": step, **evaluate(params, rest)})
    if ckpt is not None:
      ckpt.save(step, {"step": step, "params": params, "rest": rest,
                       "opt_state": opt_state}, force=step == end)
    if bar is not None:
      rate = items_per_batch * timed_steps / timed_seconds if timed_seconds else 0
      bar.set_postfix({"loss": f"{float(loss):.3f}",
                       f"{items_name}/s": f"{rate:,.0f}"}, refresh=False)
      bar.update(1)
  if bar is not None:
    bar.close()
  if ckpt is not None:
    ckpt.close()
  if end > start:
    history["val"].append({"step": end, **evaluate(params, rest)})
  nnx.update(model, params, rest)
  per_step = timed_seconds / timed_steps if timed_steps else float("nan")
  history.update({
      "time_per_step_s": per_step,
      f"{items_name}_per_s": items_per_batch / per_step if timed_steps else float("nan"),
      "final_train_loss": float(loss) if loss is not None else float("nan"),
      "final_val_loss": history["val"][-1]["loss"] if history["val"] else float("nan"),
      "params": params,
  })
  return history


def write_json(path: Optional[str], payload: dict[str, Any]) -> None:
  """Writes metrics (arrays and the raw params are left out)."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  clean = {k: v for k, v in payload.items() if k != "params"}

  def default(o):
    if isinstance(o, (np.generic, jax.Array)):
      return o.item() if np.ndim(o) == 0 else np.asarray(o).tolist()
    return str(o)

  with open(path, "w") as f:
    json.dump(clean, f, indent=1, default=default, allow_nan=True)


def finite(x: float) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)
