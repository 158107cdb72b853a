"""Helper module of the examples (not a script): optimizers by name, flags,
schedule, training loop with checkpoints and progress lines.

The loop is functional: the model is split once into a graph definition and
pure-dict parameter / other states (`nnx.split`), the jitted step merges them
back, and the optax optimizer sees a plain dict of arrays. That keeps the
dimension-number trees and the orbax checkpoints simple.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import example_mesh
import htmuon_jax
from example_checkpoints import Checkpointer

DEFAULT_LR = 1e-2
# The AdamW branch of the spectral optimizers, as in the authors' code:
# betas 0.9 / 0.95, eps 1e-10.
ADAM_B2, ADAM_EPS = 0.95, 1e-10


class UsageError(ValueError):
  """A run that cannot go ahead as asked (e.g. it would mix the checkpoints
  of two runs); `run` prints its message and exits."""


class OptimizerSpec(NamedTuple):
  """One entry of `OPTIMIZERS`.

  Attributes:
    alias: what it calls (shown by `--help`).
    build: `(schedule, adam_schedule, weight_decay, dims, power, method,
      distribute=None) -> GradientTransformation`; `power` and `method` are
      `None` unless given; `distribute` (a mesh) only for htmuon_jax's.
    paper_lr: the default peak learning rate.
    takes_power: whether `--power` applies.
    takes_method: whether `--method` applies.
    routes: whether it sends matrices to a spectral branch and the other
      leaves to AdamW (so that `--adam-lr` and the parameter split apply).
  """

  alias: str
  build: Callable[..., optax.GradientTransformation]
  paper_lr: float
  takes_power: bool
  takes_method: bool
  routes: bool


def _adamw(schedule, adam_schedule, weight_decay, dims, power, method, **_):
  del adam_schedule, dims, power, method  # One learning rate, every leaf.
  decay_mask = lambda p: jax.tree.map(lambda x: jnp.ndim(x) >= 2, p)
  return optax.adamw(
    schedule,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    weight_decay=weight_decay,
    mask=decay_mask,
  )


def _optax_muon(
  schedule, adam_schedule, weight_decay, dims, power, method, **_
):
  del power, method
  return optax.contrib.muon(
    schedule,
    weight_decay=weight_decay,
    adam_b2=ADAM_B2,
    adam_learning_rate=adam_schedule,
    muon_weight_dimension_numbers=dims,
  )


def _rmnp(
  schedule, adam_schedule, weight_decay, dims, power, method, distribute=None
):
  del power, method
  return htmuon_jax.rmnp(
    schedule,
    weight_decay=weight_decay,
    adam_learning_rate=adam_schedule,
    adam_b2=ADAM_B2,
    eps=ADAM_EPS,
    muon_weight_dimension_numbers=dims,
    distribute=distribute,
  )


def _spectral(
  factory: Callable[..., Any], **defaults: Any
) -> Callable[..., optax.GradientTransformation]:
  """`build` of an `htmuon_jax` alias; `defaults` apply unless flags say
  otherwise."""

  def build(
    schedule, adam_schedule, weight_decay, dims, power, method, distribute=None
  ):
    kwargs = dict(
      defaults,
      distribute=distribute,
      weight_decay=weight_decay,
      adam_learning_rate=adam_schedule,
      adam_b2=ADAM_B2,
      eps=ADAM_EPS,
      muon_weight_dimension_numbers=dims,
    )
    if power is not None:
      kwargs["power"] = power
    if method is not None:
      kwargs["method"] = method
    return factory(schedule, **kwargs)

  return build


# Every optimizer the examples accept, by `--optimizer` name. Peak learning
# rates: the paper's LLaMA-60M/135M runs (RMNP: its paper's default); the
# others DEFAULT_LR.
OPTIMIZERS: dict[str, OptimizerSpec] = {
  "adamw": OptimizerSpec("optax.adamw", _adamw, 1e-3, False, False, False),
  "muon": OptimizerSpec(
    "htmuon_jax.muon", _spectral(htmuon_jax.muon), 1e-2, False, True, True
  ),
  "optax_muon": OptimizerSpec(
    "optax.contrib.muon", _optax_muon, 1e-2, False, False, True
  ),
  "htmuon": OptimizerSpec(
    "htmuon_jax.htmuon", _spectral(htmuon_jax.htmuon), 3e-2, True, True, True
  ),
  "rmnp": OptimizerSpec("htmuon_jax.rmnp", _rmnp, 2e-2, False, False, True),
  "htnormuon": OptimizerSpec(
    "htmuon_jax.htnormuon",
    _spectral(htmuon_jax.htnormuon),
    DEFAULT_LR,
    True,
    True,
    True,
  ),
  "htadamuon": OptimizerSpec(
    "htmuon_jax.htadamuon",
    _spectral(htmuon_jax.htadamuon),
    DEFAULT_LR,
    True,
    True,
    True,
  ),
  # NorMuon and AdaMuon are their HT variants at power 0, by default with
  # Newton-Schulz (their own orthogonalization).
  "normuon": OptimizerSpec(
    "htmuon_jax.htnormuon(power=0)",
    _spectral(htmuon_jax.htnormuon, power=0.0, method="newton_schulz"),
    DEFAULT_LR,
    False,
    True,
    True,
  ),
  "adamuon": OptimizerSpec(
    "htmuon_jax.htadamuon(power=0)",
    _spectral(htmuon_jax.htadamuon, power=0.0, method="newton_schulz"),
    DEFAULT_LR,
    False,
    True,
    True,
  ),
}
PAPER_LR = {name: spec.paper_lr for name, spec in OPTIMIZERS.items()}


def available_optimizers() -> list[str]:
  """Names accepted by `make_optimizer` (all of `OPTIMIZERS`)."""
  return list(OPTIMIZERS)


def default_lr(name: str) -> float:
  return OPTIMIZERS[name].paper_lr if name in OPTIMIZERS else DEFAULT_LR


def warmup_cosine(
  peak: float,
  total_steps: int,
  *,
  warmup_fraction: float = 0.1,
  min_lr_ratio: float = 0.1,
) -> optax.Schedule:
  """The paper's schedule: linear warmup over 10%, cosine down to 10% of peak."""
  warmup = max(1, int(warmup_fraction * total_steps))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=peak * min_lr_ratio,
  )


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
  distribute: Any = None,
) -> optax.GradientTransformation:
  """Builds an optimizer by name with the paper's schedule and splits.

  Args:
    name: a key of `OPTIMIZERS`.
    learning_rate: peak learning rate of the main (matrix) branch.
    total_steps: length of the warmup + cosine schedule.
    weight_decay: decoupled weight decay of matrices (AdamW: of every 2-D+
      leaf).
    weight_dimension_numbers: which leaves are matrices (a tree or callable,
      see `htmuon_jax.htmuon`); the rest go to AdamW with `adam_lr`.
    power: HTMuon's exponent (only optimizers with `takes_power`).
    method: spectral method (only optimizers with `takes_method`).
    adam_lr: peak learning rate of the AdamW branch (the authors: 1e-3,
      betas 0.9 / 0.95, eps 1e-10).
    distribute: the spectral step's `distribute=` (a mesh; the htmuon_jax
      optimizers only; adamw and optax_muon ignore it).

  Returns:
    An `optax.GradientTransformation`.

  Raises:
    ValueError: an unknown `name`, or `power` / `method` for an optimizer
      that has none.
  """
  if name not in OPTIMIZERS:
    raise ValueError(
      f"optimizer: unknown {name!r}; available: {available_optimizers()}."
    )
  spec = OPTIMIZERS[name]
  if power is not None and not spec.takes_power:
    raise ValueError(
      f"power: {name} has no exponent; "
      f"those with one: {_names_with('takes_power')}."
    )
  if method is not None and not spec.takes_method:
    raise ValueError(
      f"method: {name} has no spectral method; "
      f"those with one: {_names_with('takes_method')}."
    )
  return spec.build(
    warmup_cosine(learning_rate, total_steps),
    warmup_cosine(adam_lr, total_steps),
    weight_decay,
    weight_dimension_numbers,
    power,
    method,
    distribute=distribute,
  )


def _names_with(attribute: str) -> str:
  return ", ".join(n for n, s in OPTIMIZERS.items() if getattr(s, attribute))


# ---------------------------------------------------------------------------
# Flags


class HelpFormatter(
  argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter
):
  """Shows every default once and keeps the epilog's table as written.

  A `None` default is explained by the help text itself, a switch's
  `False` goes without saying, and a help text that names its default
  (`"default: ..."`) gets no second `(default: ...)`."""

  def _get_help_string(self, action: argparse.Action) -> Optional[str]:
    help_text = action.help or ""
    if (
      action.default is None
      or (isinstance(action.default, bool) and action.nargs == 0)
      or "default" in help_text
    ):
      return action.help
    return super()._get_help_string(action)


def optimizer_table() -> str:
  """The `--optimizer` table of the scripts' `--help`."""
  lines = [
    "optimizers (--optimizer NAME: what it calls, default --lr, flags "
    "it takes):"
  ]
  for name, spec in OPTIMIZERS.items():
    takes = [
      f
      for f, ok in (
        ("--power", spec.takes_power),
        ("--method", spec.takes_method),
        ("--adam-lr", spec.routes),
      )
      if ok
    ]
    lines.append(
      (
        f"  {name:10} {spec.alias:30} lr {spec.paper_lr:<6g} " + " ".join(takes)
      ).rstrip()
    )
  return "\n".join(lines)


def new_parser(doc: str) -> argparse.ArgumentParser:
  """A parser with the scripts' help layout: the first paragraph of `doc`,
  every default, the optimizer table and a note on CPU threads."""
  return argparse.ArgumentParser(
    description=doc.split("\n\n")[0],
    formatter_class=HelpFormatter,
    epilog=optimizer_table() + "\n\n" + THREADS_NOTE,
  )


THREADS_NOTE = (
  "CPU threads: the examples set OPENBLAS_NUM_THREADS=1 unless it is set:\n"
  "more BLAS threads than free cores can make a step many times slower on\n"
  "a busy machine."
)


def add_optimizer_flags(
  p: argparse.ArgumentParser, default: str = "htmuon"
) -> None:
  p.add_argument(
    "--optimizer",
    default=default,
    choices=list(OPTIMIZERS),
    help="see the table below",
  )
  p.add_argument(
    "--lr",
    type=learning_rate_flag,
    default=None,
    help="peak learning rate of the matrix branch (adamw: of "
    "every leaf); default: the optimizer's in the table",
  )
  p.add_argument(
    "--adam-lr",
    type=learning_rate_flag,
    default=1e-3,
    help="peak learning rate of the AdamW branch (non-matrix "
    "leaves) of the spectral optimizers",
  )
  p.add_argument(
    "--weight-decay",
    type=float,
    default=0.1,
    help="decoupled weight decay of the matrices",
  )
  p.add_argument(
    "--power",
    type=float,
    default=None,
    help="HTMuon's exponent p, for "
    f"{_names_with('takes_power')}; default: the "
    "optimizer's (0.125)",
  )
  p.add_argument(
    "--method",
    default=None,
    help="spectral method (svd, eigh, polynomial, newton_schulz, "
    "stream, auto, ...), for "
    f"{_names_with('takes_method')}; default: the "
    "optimizer's (htmuon, htnormuon, htadamuon: auto; "
    "muon, normuon, adamuon: newton_schulz)",
  )


def add_training_flags(
  p: argparse.ArgumentParser,
  *,
  steps: int,
  eval_every: int,
  log_every: int = 10,
  checkpoint_every: int = 100,
) -> None:
  p.add_argument(
    "--steps",
    type=positive_int_flag,
    default=steps,
    help="training steps (the learning-rate schedule spans them)",
  )
  p.add_argument(
    "--eval-every",
    type=int,
    default=eval_every,
    help="validation period in steps (0: only at the end)",
  )
  p.add_argument(
    "--log-every",
    type=int,
    default=log_every,
    help="a progress line (loss, val loss, throughput) every N steps",
  )
  p.add_argument(
    "--seed",
    type=int,
    default=0,
    help="seed of the initialization and of the batches",
  )
  p.add_argument(
    "--checkpoint-dir",
    default=None,
    help="save checkpoints here (default: none)",
  )
  p.add_argument(
    "--checkpoint-every",
    type=int,
    default=checkpoint_every,
    help="checkpoint period in steps (the last step is always saved)",
  )
  p.add_argument(
    "--resume",
    action="store_true",
    help="continue the run in --checkpoint-dir (with the same flags)",
  )
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="delete the checkpoints in --checkpoint-dir and start fresh",
  )
  p.add_argument(
    "--stop-after",
    type=int,
    default=None,
    help="stop after this step, as if interrupted (the schedule "
    "still spans --steps; continue with --resume)",
  )
  p.add_argument(
    "--metrics-json", default=None, help="write the metrics to this JSON file"
  )
  p.add_argument(
    "--alpha-every",
    type=int,
    default=0,
    help="record per-matrix power-law alpha every N steps into "
    "the metrics (0: off)",
  )
  p.add_argument(
    "--alpha-xmin",
    default="median",
    choices=("median", "ks"),
    help="alpha estimator of --alpha-every",
  )
  p.add_argument(
    "--no-progress",
    action="store_true",
    help="no progress bar (the progress lines stay)",
  )


def dataset_flag(offline_name: str) -> Callable[[str], str]:
  """An argparse `type`: `offline_name` or `tfds:NAME[:SPLIT]`, else a
  one-line usage error (not a traceback from the loader)."""

  def parse(value: str) -> str:
    if value == offline_name or (
      value.startswith("tfds:") and value.split(":", 2)[1]
    ):
      return value
    raise argparse.ArgumentTypeError(
      f"expected {offline_name!r} or 'tfds:NAME[:SPLIT]', got {value!r}"
    )

  parse.__name__ = "dataset"  # argparse names the type in its message
  return parse


def learning_rate_flag(value: str) -> float:
  """An argparse `type`: a finite float >= 0 (a negative learning rate
  trains uphill), else a one-line usage error."""
  try:
    v = float(value)
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected a number, got {value!r}"
    ) from None
  if not math.isfinite(v) or v < 0:
    raise argparse.ArgumentTypeError(
      f"expected a finite number >= 0, got {value!r}"
    )
  return v


def positive_int_flag(value: str) -> int:
  """An argparse `type`: an int >= 1, else a one-line usage error."""
  try:
    v = int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected an integer, got {value!r}"
    ) from None
  if v < 1:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
  return v


def widths_flag(value: str) -> str:
  """An argparse `type`: comma-separated ints >= 1 (kept as the string)."""
  try:
    ok = all(int(w) >= 1 for w in value.split(","))
  except ValueError:
    ok = False
  if not ok:
    raise argparse.ArgumentTypeError(
      f"expected comma-separated integers >= 1 (e.g. 16,32), got {value!r}"
    )
  return value


def add_dataset_flags(
  p: argparse.ArgumentParser, *, default: str, offline: str, example: str
) -> None:
  p.add_argument(
    "--dataset",
    default=default,
    type=dataset_flag(default),
    help=f"{offline} or 'tfds:NAME[:SPLIT]' (e.g. {example}; "
    "needs tensorflow-datasets)",
  )
  p.add_argument(
    "--data-dir",
    default=None,
    help="tensorflow-datasets data dir (read from, and written "
    "with --download); default: $TFDS_DATA_DIR or "
    "~/tensorflow_datasets",
  )
  p.add_argument(
    "--download",
    action="store_true",
    help="download and prepare a tfds dataset that is not in "
    "--data-dir yet (needs internet)",
  )


_UNSET = object()


def given_flags(
  parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]
) -> tuple[argparse.Namespace, frozenset[str]]:
  """Parses `argv` and says which flags were given (not defaulted).

  Returns:
    The parsed namespace (defaults filled in) and the `dest`s given.
  """
  defaults = vars(parser.parse_args([]))
  # argparse fills in a default only where the namespace lacks the attribute.
  marked = parser.parse_args(
    argv, namespace=argparse.Namespace(**{k: _UNSET for k in defaults})
  )
  given = frozenset(k for k, v in vars(marked).items() if v is not _UNSET)
  args = argparse.Namespace(
    **{k: defaults[k] if v is _UNSET else v for k, v in vars(marked).items()}
  )
  return args, given


IGNORED_FLAGS = ("error", "warn")


def parse_args(
  parser: argparse.ArgumentParser,
  argv: Optional[Sequence[str]] = None,
  *,
  ignored_flags: str = "error",
) -> argparse.Namespace:
  """`parser.parse_args(argv)` that refuses flags the run would ignore.

  Exits through `parser.error` (status 2, naming the flag) for `--power` or
  `--method` with an optimizer that has none, `--adam-lr` or a parameter
  split with adamw, checkpoint flags without `--checkpoint-dir`, tfds flags
  with an offline dataset.

  Args:
    parser: the script's parser.
    argv: the arguments (`None`: `sys.argv[1:]`).
    ignored_flags: `"error"`, or `"warn"`: optimizer flags that this
      optimizer ignores only print a warning and are reset to their
      defaults (for `compare.py`, which passes the same flags to every
      optimizer); other conflicts still exit.

  Returns:
    The parsed arguments.
  """
  if ignored_flags not in IGNORED_FLAGS:
    raise ValueError(
      f"ignored_flags: expected one of {IGNORED_FLAGS}, got {ignored_flags!r}."
    )
  args, given = given_flags(parser, argv)
  spec = OPTIMIZERS[args.optimizer]
  name = args.optimizer

  def refuse(flag: str, why: str, ignorable: bool = False) -> None:
    value = getattr(args, flag)
    shown = "" if isinstance(value, bool) else f" {value}"
    message = f"--{flag.replace('_', '-')}{shown}: {why}"
    if ignorable and ignored_flags == "warn":
      print(f"warning: {message}", file=sys.stderr)
      setattr(args, flag, parser.get_default(flag))  # Ignored, as it says.
    else:
      parser.error(message)

  if "power" in given and not spec.takes_power:
    refuse(
      "power",
      f"{name} has no exponent (it would be ignored); those "
      f"with one: {_names_with('takes_power')}",
      True,
    )
  if "method" in given and not spec.takes_method:
    refuse(
      "method",
      f"{name} has no spectral method (it would be ignored); "
      f"those with one: {_names_with('takes_method')}",
      True,
    )
  if not spec.routes:
    for flag in ("adam_lr", "split", "routing"):
      if flag in given:
        refuse(
          flag,
          f"{name} trains every leaf alike with --lr (it would be ignored)",
          True,
        )
  if not getattr(args, "checkpoint_dir", None):
    for flag in ("resume", "overwrite", "checkpoint_every"):
      if flag in given:
        refuse(flag, "needs --checkpoint-dir")
  if getattr(args, "resume", False) and getattr(args, "overwrite", False):
    refuse(
      "overwrite",
      "contradicts --resume (continue the run, or delete "
      "its checkpoints and start fresh: one of them)",
    )
  if hasattr(args, "dataset") and not str(args.dataset).startswith("tfds:"):
    for flag in ("data_dir", "download"):
      if flag in given:
        refuse(
          flag, f"only for --dataset tfds:NAME (--dataset is {args.dataset!r})"
        )
  if hasattr(args, "steps") and hasattr(args, "weight_decay"):
    # Build the optimizer once, so that a value it rejects (e.g. --power 2,
    # --method foo) is a one-line usage error here, not a traceback later.
    try:
      make_optimizer(
        name,
        learning_rate=default_lr(name) if args.lr is None else args.lr,
        total_steps=args.steps,
        weight_decay=args.weight_decay,
        power=args.power,
        method=args.method,
        adam_lr=args.adam_lr,
      )
    except ValueError as e:
      parser.error(str(e))
  return args


# Flags that steer a run without changing what it computes: they may differ
# between a run and its resumption.
RUN_CONTROL_FLAGS = frozenset(
  {
    "resume",
    "overwrite",
    "stop_after",
    "checkpoint_dir",
    "checkpoint_every",
    "metrics_json",
    "no_progress",
    "log_every",
    "eval_every",
    "data_dir",
    "download",
    "alpha_every",
    "alpha_xmin",
  }
  | example_mesh.MESH_FLAGS
)


def run_config(args: argparse.Namespace) -> dict[str, Any]:
  """The flags that make a run what it is (see `RUN_CONTROL_FLAGS`)."""
  return {k: v for k, v in vars(args).items() if k not in RUN_CONTROL_FLAGS}


def routing_line(optimizer: str, params: Any, dims: Any) -> str:
  """One line: which leaves the optimizer treats as matrices."""
  if not OPTIMIZERS[optimizer].routes:
    return f"routing: {optimizer} updates every leaf alike (no matrix split)"
  return htmuon_jax.describe_routing(params, dims, summary=True)


def run(main: Callable[[], Any], *errors: type[BaseException]) -> None:
  """Runs a script's `main`; a `UsageError` (or one of `errors`) exits with
  its one-line message instead of a traceback."""
  try:
    main()
  except (UsageError, *errors) as e:
    sys.exit(f"error: {e}")


# ---------------------------------------------------------------------------
# Training


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """Key path of a pure-dict leaf as strings."""
  return tuple(
    str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    for k in path
  )


def progress_line(
  step: int,
  steps: int,
  loss: float,
  val: Optional[dict[str, Any]],
  rate: float,
  items_name: str,
) -> str:
  """`step 40/400  loss 2.3021  val 2.4110 (step 30)  12,345 tokens/s`."""
  line = f"step {step:>{len(str(steps))}}/{steps}  loss {loss:.4f}"
  if val:
    line += f"  val {val['loss']:.4f}" + "".join(
      f" {k} {v:.3f}" for k, v in val.items() if k not in ("loss", "step")
    )
    if val["step"] != step:
      line += f" (step {val['step']})"
  else:
    line += "  val -"
  rate_text = f"{rate:,.0f}" if rate else "-"
  return line + f"  {rate_text} {items_name}/s"


def _shown(value: Any) -> str:
  """A flag's value as a message shows it (`None`: the flag was not given)."""
  return "not given (its default)" if value is None else str(value)


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
  """`--flag STORED in the checkpoint, NOW now` for each flag that differs."""
  # Compare as JSON (the record's form): tuples are lists there.
  now = json.loads(json.dumps(now, default=str))
  return [
    f"--{k.replace('_', '-')} {_shown(saved[k])} in the checkpoint, "
    f"{_shown(now[k])} now"
    for k in now
    if k in saved and saved[k] != now[k]
  ]


def _open_checkpoints(
  directory: str,
  *,
  every: int,
  steps: int,
  resume: bool,
  overwrite: bool,
  config: Optional[dict[str, Any]],
  state: Any,
  log: Callable[[str], None],
) -> tuple[Checkpointer, Any, dict[str, Any]]:
  """The checkpointer, the state to start from and the stored history."""
  ckpt = Checkpointer(directory, every=every)
  existing = ckpt.all_steps()
  if not resume:
    if existing and not overwrite:
      ckpt.close()
      raise UsageError(
        f"checkpoint-dir: {directory} holds checkpoints (steps "
        f"{sorted(existing)}) of an earlier run; a fresh run there would "
        "mix them up. Pass --resume to continue that run, --overwrite to "
        "delete them and start fresh, or another --checkpoint-dir."
      )
    if existing:
      log(
        f"--overwrite: deleted the checkpoints at steps "
        f"{sorted(ckpt.delete_all())} in {directory}"
      )
    log(f"starting fresh; checkpoints every {every} steps in {directory}")
    return ckpt, state, {}
  if not existing:
    log(f"no checkpoint in {directory}, starting fresh")
    return ckpt, state, {}
  restored = ckpt.restore(state)
  record = restored.record
  diffs = _differences(record.get("config", {}), config or {})
  if diffs:
    ckpt.close()
    raise UsageError(
      f"resume: {directory} holds another configuration ("
      + "; ".join(diffs)
      + "). A resumed run must keep every training flag"
      + (
        " (--steps sets the length of the learning-rate schedule)"
        if "steps" in (config or {})
        and record.get("config", {}).get("steps", config["steps"])
        != config["steps"]
        else ""
      )
      + ". Rerun with the checkpoint's flags, or pass "
      "--overwrite instead of --resume to start over."
    )
  start = int(restored.state["step"])
  log(f"resumed from step {start} of {steps} ({directory})")
  return ckpt, restored.state, record.get("history", {})


def show_progress_bar(stream: Any = None) -> bool:
  """Whether a progress bar may be drawn: only on a terminal (tqdm draws on
  stderr), so redirected output holds the progress lines, not bar frames."""
  stream = sys.stderr if stream is None else stream
  isatty = getattr(stream, "isatty", None)
  return bool(isatty and isatty())


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
  overwrite: bool = False,
  config: Optional[dict[str, Any]] = None,
  stop_after: Optional[int] = None,
  items_per_batch: int = 1,
  items_name: str = "batches",
  progress: bool = True,
  desc: str = "train",
  log: Optional[Callable[[str], None]] = None,
  alpha_monitor: Optional[Callable[[int, Any], Any]] = None,
  layout: Optional[example_mesh.Layout] = None,
  compiled_stats: bool = False,
) -> dict[str, Any]:
  """Trains `model` in place and returns the metrics.

  Prints a progress line every `log_every` steps and at the end (kept above
  the progress bar), and what happened to the checkpoints.

  Args:
    model: a Flax NNX module (its parameters are `nnx.Param`s).
    tx: the optax optimizer for the pure-dict parameter tree.
    loss_fn: `(model, batch) -> (mean loss, metrics)`; the model is in train
      mode; mutations of non-parameter state (e.g. batch statistics) are kept.
    batch_fn: `step -> batch` for steps `1..steps`.
    eval_batches: fixed validation batches (`loss_fn` in eval mode, averaged).
    steps: total number of steps.
    eval_every: validation period (0: only at the end).
    log_every: how often to record the training loss and print a line.
    checkpoint_dir: where to save checkpoints (None: no checkpoints).
    checkpoint_every: checkpoint period; the last step is always saved.
    resume: continue from the latest checkpoint in `checkpoint_dir`.
    overwrite: delete the checkpoints in `checkpoint_dir` first (without
      `resume`).
    config: what makes this run what it is (`run_config(args)`); saved with
      the checkpoints and, on `resume`, required to be unchanged.
    stop_after: stop after this step (simulates an interruption; the
      schedule still runs over `steps`).
    items_per_batch: tokens (or examples) per batch, for the throughput.
    items_name: what `items_per_batch` counts.
    progress: show a tqdm progress bar.
    desc: progress bar label.
    log: where the lines go (default: `print`, or `tqdm.write` under the bar).
    alpha_monitor: called as `alpha_monitor(step, params)` at step 0 (fresh
      runs) and after every step, e.g. a `diagnostics.AlphaMonitor`; what it
      returns when not `None` (a NamedTuple or dict) goes to
      `history["alpha"]`. Not counted in the time per step.
    layout: a device mesh to train on (`example_mesh.layout`): parameters
      split by its rule, the optimizer state after them
      (`htmuon_jax.state_shardings`), batches over its batch axes, and a
      checkpoint restored onto it whatever mesh saved it. None: one device.
    compiled_stats: record the compiled step's per-device memory
      (`memory_analysis()`) and collectives (`htmuon_jax.testing.
      count_collectives`) in `history["compiled"]` and print them.

  Returns:
    `{"train": [{step, loss}], "val": [{step, loss, ...}], "time_per_step_s",
    f"{items_name}_per_s", "final_train_loss", "final_val_loss", "steps",
    "start_step", "params"}`; a resumed run's lists include the steps before
    the checkpoint.

  Raises:
    UsageError: a fresh run into a directory with checkpoints (without
      `overwrite`), or a resumed run whose `config` differs from the saved
      one.
  """
  bar = None
  progress = progress and show_progress_bar()
  if progress:
    from tqdm.auto import tqdm

    write = lambda line: tqdm.write(line, file=sys.stdout)
  else:
    write = lambda line: print(line, flush=True)
  log = log or write

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  if layout is None:
    opt_state = tx.init(params)
    put_batch = put_eval = lambda batch: batch
    shardings: dict[str, Any] = {}
  else:
    param_shard = layout.param_shardings(params)
    rest_shard = jax.tree.map(lambda _: layout.replicated, rest)
    params = layout.put(params, param_shard)
    rest = layout.put(rest, rest_shard)
    state_shard = htmuon_jax.state_shardings(tx, params)
    opt_state = jax.jit(tx.init, out_shardings=state_shard)(params)
    put_batch, put_eval = layout.put_batch, layout.put_eval
    out = (param_shard, rest_shard, state_shard)
    shardings = dict(
      in_shardings=(*out, layout.batch_sharding),
      out_shardings=(*out, layout.replicated, layout.replicated),
    )
  state = {"step": 0, "params": params, "rest": rest, "opt_state": opt_state}

  ckpt, stored = None, {}
  if checkpoint_dir:
    ckpt, state, stored = _open_checkpoints(
      checkpoint_dir,
      every=checkpoint_every or steps,
      steps=steps,
      resume=resume,
      overwrite=overwrite,
      config=config,
      state=state,
      log=log,
    )
  elif resume or overwrite:
    raise UsageError("resume / overwrite: need a checkpoint_dir.")
  start = int(state["step"])

  def merged(params, rest, train_mode):
    m = nnx.merge(graphdef, params, rest)
    m.train() if train_mode else m.eval()
    return m

  @functools.partial(jax.jit, **shardings)
  def train_step(params, rest, opt_state, batch):
    def loss_of(p):
      m = merged(layout.gathered(p) if layout else p, rest, True)
      loss, metrics = loss_fn(m, batch)
      new_rest = nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))
      return loss, (metrics, new_rest)

    (loss, (metrics, new_rest)), grads = jax.value_and_grad(
      loss_of, has_aux=True
    )(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, new_rest, opt_state, loss, metrics

  @jax.jit
  def eval_step(params, rest, batch):
    p = layout.gathered(params) if layout else params
    return loss_fn(merged(p, rest, False), batch)

  def evaluate(params, rest):
    # Weighted by batch size: the last batch may be smaller.
    totals: dict[str, float] = {}
    count = 0
    for batch in eval_batches:
      n = len(jax.tree.leaves(batch)[0])
      loss, metrics = eval_step(params, rest, put_eval(batch))
      for k, v in {"loss": loss, **metrics}.items():
        totals[k] = totals.get(k, 0.0) + n * float(v)
      count += n
    return {k: v / max(1, count) for k, v in totals.items()}

  end = steps if stop_after is None else min(steps, stop_after)
  history: dict[str, Any] = {
    "train": list(stored.get("train", [])),
    "val": list(stored.get("val", [])),
    "start_step": start,
    "steps": steps,
  }
  if alpha_monitor is not None:
    history["alpha"] = []  # A resumed run records from its checkpoint on.

  def monitor(step, params):
    if alpha_monitor is not None:
      if layout is not None:
        due = getattr(alpha_monitor, "due", lambda _: True)
        if not due(step):
          return
        # Whole matrices on the host: the monitor's SVD takes no split axes.
        params = layout.to_host(params)
      snap = alpha_monitor(step, params)
      if snap is not None:
        history["alpha"].append(
          snap._asdict() if hasattr(snap, "_asdict") else dict(snap)
        )

  if start == 0:
    monitor(0, state["params"])
  rate_key = f"{items_name}_per_s"
  if progress and end > start:
    bar = tqdm(
      total=end, initial=start, desc=desc, leave=False, dynamic_ncols=True
    )
  params, rest, opt_state = state["params"], state["rest"], state["opt_state"]
  timed_steps, timed_seconds, loss = 0, 0.0, None
  for step in range(start + 1, end + 1):
    batch = put_batch(batch_fn(step))
    if compiled_stats and step == start + 1:
      history["compiled"] = step_stats(
        train_step.lower(params, rest, opt_state, batch).compile()
      )
      log(stats_line(history["compiled"]))
    t0 = time.perf_counter()
    params, rest, opt_state, loss, _ = train_step(
      params, rest, opt_state, batch
    )
    if step > start + 1:  # The first step includes compilation.
      loss.block_until_ready()
      timed_seconds += time.perf_counter() - t0
      timed_steps += 1
    rate = items_per_batch * timed_steps / timed_seconds if timed_seconds else 0
    monitor(step, params)
    if step == end or (eval_every and step % eval_every == 0):
      history["val"].append({"step": step, **evaluate(params, rest)})
    if step % log_every == 0 or step == end:
      history["train"].append({"step": step, "loss": float(loss)})
      write(
        progress_line(
          step,
          steps,
          float(loss),
          history["val"][-1] if history["val"] else None,
          rate,
          items_name,
        )
      )
    if ckpt is not None and (step == end or step % ckpt.every == 0):
      per_step = timed_seconds / timed_steps if timed_steps else float("nan")
      record = {
        "config": config or {},
        "history": {
          "train": history["train"],
          "val": history["val"],
          "time_per_step_s": per_step,
          rate_key: rate or float("nan"),
        },
      }
      ckpt.save(
        step,
        {"step": step, "params": params, "rest": rest, "opt_state": opt_state},
        record,
        force=step == end,
      )
    if bar is not None:
      bar.set_postfix(
        {"loss": f"{float(loss):.3f}", f"{items_name}/s": f"{rate:,.0f}"},
        refresh=False,
      )
      bar.update(1)
  if bar is not None:
    bar.close()
  if ckpt is not None:
    ckpt.close()
  if layout is not None:  # Host copies: on several processes, gathered.
    params, rest = layout.to_host(params), layout.to_host(rest)
  nnx.update(model, params, rest)
  if timed_steps:
    per_step = timed_seconds / timed_steps
    items_per_s = items_per_batch / per_step
  else:  # Nothing timed in this session: the stored run's numbers.
    per_step = stored.get("time_per_step_s", float("nan"))
    items_per_s = stored.get(rate_key, float("nan"))
  final_train = (
    float(loss)
    if loss is not None
    else (history["train"][-1]["loss"] if history["train"] else float("nan"))
  )
  history.update(
    {
      "time_per_step_s": per_step,
      rate_key: items_per_s,
      "final_train_loss": final_train,
      "final_val_loss": history["val"][-1]["loss"]
      if history["val"]
      else float("nan"),
      "params": params,
    }
  )
  if end <= start and checkpoint_dir:
    log(
      f"the run in {checkpoint_dir} is at step {start} already (of "
      f"{steps}): nothing to train; its final metrics follow"
    )
  return history


MEMORY_FIELDS = (
  "argument_size_in_bytes",
  "output_size_in_bytes",
  "alias_size_in_bytes",
  "temp_size_in_bytes",
  "generated_code_size_in_bytes",
)


def step_stats(compiled: Any) -> dict[str, Any]:
  """Per-device memory and collectives of a compiled training step."""
  from htmuon_jax import testing  # Only for this report.

  memory = compiled.memory_analysis()
  return {
    "memory_per_device": {
      k: int(getattr(memory, k, 0) or 0) for k in MEMORY_FIELDS
    },
    "collectives": testing.count_collectives(compiled),
  }


def stats_line(stats: dict[str, Any]) -> str:
  """`compiled step: per device 1.2 MiB arguments, ...; collectives ...`."""
  mib = lambda n: f"{n / 2**20:.2f} MiB"
  m = stats["memory_per_device"]
  ops = stats["collectives"]["total"]
  shown = ", ".join(f"{n} {op}" for op, n in sorted(ops.items()) if n)
  return (
    f"compiled step: per device {mib(m['argument_size_in_bytes'])} "
    f"arguments, {mib(m['output_size_in_bytes'])} outputs "
    f"({mib(m['alias_size_in_bytes'])} aliased), "
    f"{mib(m['temp_size_in_bytes'])} temporaries; collectives: "
    f"{shown or 'none'}"
  )


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
