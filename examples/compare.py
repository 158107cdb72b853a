"""Compare optimizers on the same model, data, seed and step budget.

Trains the LLaMA-style decoder of `train_lm.py` (or, with `--task resnet`,
the ResNet of `train_resnet.py`) once per optimizer, from the same
initialization and on the same batches, then

* prints a markdown table: final train / validation loss, time per step,
  mean power-law alpha of the weight matrices (both estimators);
* saves `loss_curves.png` (train and validation loss per step),
  `alphas.png` (per-matrix alpha at the end; the initialization for
  reference) and, for the LM, `alpha_over_training.png` (mean alpha every
  `--alpha-every` steps) under `--out-dir`, with `results.json` and per-run
  metrics. `results.json` records what produced it (`provenance`: command,
  date, versions, git commit, a fingerprint of each optimizer). An
  optimizer that fails is reported; the others are kept.

With `--sweep`, each optimizer gets a learning-rate grid around its paper
value and several seeds at the best one (see `sweep.py`): tables of
validation loss mean +- std, `lr_sweep.png`, loss curves with a band over
the seeds.

Every flag it does not know is passed on to the training script (listed at
the end of `--help`), e.g.

    python examples/compare.py                         # defaults: ~6 minutes on 2 CPU cores
    python examples/compare.py --steps 2000 --dim 256 --layers 6 --seq-len 256
    python examples/compare.py --sweep --steps 1000 --dim 128 --seq-len 128
    python examples/compare.py --task resnet --dataset tfds:cifar10 --widths 64,128,256
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

# Before numpy / jax load OpenBLAS: one thread unless the user chose.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import datetime
import shlex
import subprocess
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_plots  # noqa: E402
import example_utils  # noqa: E402
import sweep  # noqa: E402

from htmuon_jax import diagnostics  # noqa: E402

DEFAULT_OPTIMIZERS = ("adamw", "muon", "htmuon", "rmnp")
# Flags of the training scripts that compare.py sets itself.
OWN_FLAGS = ("--optimizer", "--metrics-json")
SWEEP_FLAGS = ("--lr", "--seed")


def _script(task: str):
  if task == "lm":
    import train_lm as script
  else:
    import train_resnet as script
  return script


def passed_through_flags(task: str) -> list[str]:
  """The training script's flags that compare.py passes on unchanged."""
  own = set(OWN_FLAGS) | {"--help", "--alpha-xmin"}  # --alpha-xmin: both.
  flags = []
  for action in _script(task).parser()._actions:  # argparse has no public API.
    flags += [
      o for o in action.option_strings if o.startswith("--") and o not in own
    ]
  return flags


def _epilog() -> str:
  lines = ["Any other flag goes to the training script unchanged:"]
  for task, script in (("lm", "train_lm.py"), ("resnet", "train_resnet.py")):
    lines.append(
      f"  --task {task} ({script}): " + " ".join(passed_through_flags(task))
    )
  lines += [
    f"compare.py sets {', '.join(OWN_FLAGS)} itself (and --alpha-xmin "
    f"from its own flag), with --sweep also {', '.join(SWEEP_FLAGS)}; "
    "--alpha-every defaults to steps // 10.",
    "Run `python examples/train_lm.py --help` for what each one does.",
  ]
  return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    epilog=_epilog(),
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,
  )  # Else `--lr` would be read as `--lr-factors`.
  p.add_argument(
    "--task",
    default="lm",
    choices=("lm", "resnet"),
    help="model and data (default: lm)",
  )
  p.add_argument(
    "--optimizers",
    default=None,
    help="comma-separated, from: "
    + ",".join(available())
    + " (default: adamw,muon,htmuon,rmnp)",
  )
  p.add_argument(
    "--out-dir",
    default="runs/compare",
    help="where tables, plots and metrics go (default: runs/compare)",
  )
  p.add_argument(
    "--alpha-xmin",
    default="median",
    choices=("median", "ks"),
    help="estimator of the alpha plots (default: median)",
  )
  p.add_argument(
    "--sweep",
    action="store_true",
    help="learning-rate grid per optimizer, then more seeds at "
    "the best value (see sweep.py)",
  )
  p.add_argument(
    "--lr-factors",
    default="1,0.5,2,4",
    help="--sweep: grid = paper lr times these, run in this "
    "order (default: 1,0.5,2,4)",
  )
  p.add_argument(
    "--lr-grid",
    action="append",
    default=[],
    metavar="NAME=LR,LR,...",
    help="--sweep: explicit learning rates of one optimizer, "
    "instead of its paper lr times --lr-factors (repeatable;"
    " e.g. to extend a grid whose best value is at an edge)",
  )
  p.add_argument(
    "--sweep-seeds",
    default="0,1,2",
    help="--sweep: the first picks the lr, all run at the chosen "
    "lr (default: 0,1,2)",
  )
  p.add_argument(
    "--report-only",
    action="store_true",
    help="--sweep: train nothing, rewrite the tables and plots "
    "from the runs in --out-dir (e.g. of an interrupted "
    "sweep)",
  )
  return p


def run_one(
  task: str,
  name: str,
  extra: list[str],
  out_dir: str,
  metrics_json: Optional[str] = None,
) -> dict[str, Any]:
  argv = [
    "--optimizer",
    name,
    "--metrics-json",
    metrics_json or os.path.join(out_dir, f"metrics_{name}.json"),
    *extra,
  ]
  # The same flags go to every optimizer: ones it ignores only warn.
  return _script(task).main(argv, ignored_flags="warn")


def initial_params(task: str, extra: list[str]) -> tuple[Any, Any]:
  """The common initialization (same seed as the runs) and its dims."""
  from flax import nnx

  script = _script(task)
  if task == "lm":
    # htmuon takes every optimizer flag (the model does not depend on it).
    args = script.parser().parse_args(["--optimizer", "htmuon", *extra])
    _, model, _, _, dims, _ = script.build(args)
  else:
    import example_data

    args = script.parser().parse_args(["--optimizer", "adamw", *extra])
    data = example_data.load_images(
      args.dataset, max_examples=args.max_examples, seed=args.seed
    )
    model = script.ResNet(
      data.train_x.shape[-1],
      data.num_classes,
      tuple(int(w) for w in args.widths.split(",")),
      args.blocks_per_stage,
      rngs=nnx.Rngs(args.seed),
    )
    dims = lambda p: script.resnet_dimension_numbers(p, split=args.split)
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), dims


def mean_alpha(rows: list[diagnostics.LayerAlpha]) -> float:
  values = [r.alpha for r in rows if np.isfinite(r.alpha)]
  return float(np.mean(values)) if values else float("nan")


def results_table(rows: list[dict[str, Any]]) -> str:
  has_acc = any("val_accuracy" in r for r in rows)
  head = (
    "| optimizer | peak lr | final train loss | final val loss | "
    + ("val accuracy | " if has_acc else "")
    + "time / step (ms) | mean alpha (KS xmin) | mean alpha (median xmin) |"
  )
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    lines.append(
      f"| {r['optimizer']} | {r['lr']:g} | {r['final_train_loss']:.4f} | "
      f"{r['final_val_loss']:.4f} | "
      + (f"{r.get('val_accuracy', float('nan')):.3f} | " if has_acc else "")
      + f"{1e3 * r['time_per_step_s']:.1f} | {r['alpha_ks']:.2f} | "
      f"{r['alpha_median']:.2f} |"
    )
  return "\n".join(lines)


def plot(
  histories: dict[str, dict[str, Any]],
  alphas: dict[str, list[diagnostics.LayerAlpha]],
  out_dir: str,
  title: str,
  xmin: str,
  unit: str,
) -> list[str]:
  pngs = [
    compare_plots.plot_loss_curves(
      {name: [h] for name, h in histories.items()},
      os.path.join(out_dir, "loss_curves.png"),
      title=title,
      unit=unit,
    )
  ]
  pngs.append(
    compare_plots.plot_final_alphas(
      alphas,
      os.path.join(out_dir, "alphas.png"),
      title=f"{title}: power-law alpha per weight matrix at the end "
      f"({xmin} xmin), lower = heavier tail",
    )
  )
  over = {name: [h["alpha"]] for name, h in histories.items() if h.get("alpha")}
  if over:
    pngs.append(
      compare_plots.plot_alpha_over_training(
        over,
        os.path.join(out_dir, "alpha_over_training.png"),
        title=f"{title}: mean alpha of the weight matrices during training",
        xmin=xmin,
      )
    )
  return pngs


def available() -> list[str]:
  """The optimizers of `example_utils` that can be built (no submodules)."""
  import htmuon_jax

  return [
    n
    for n in example_utils.available_optimizers()
    if n in ("adamw", "optax_muon") or callable(getattr(htmuon_jax, n, None))
  ]


def _names(args: argparse.Namespace) -> list[str]:
  available_names = available()
  if args.optimizers:
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in available_names]
    if unknown:
      raise ValueError(
        f"optimizers: unknown {unknown}; available: {available_names}."
      )
    return names
  return [n for n in DEFAULT_OPTIMIZERS if n in available_names]


def optimizer_fingerprint(name: str) -> list[float]:
  """What the optimizer `name` of the examples does, in a few numbers.

  Three updates of a fixed small tree (a 12 x 8 matrix, its transpose's
  shape and a bias) with fixed gradients, built as the training scripts
  build it (`example_utils.make_optimizer` with its default learning rate,
  a 400-step schedule and weight decay 0.1); returns the sum of absolute
  parameter changes per leaf. Stored with committed results: when the
  code's optimizer changes (a new scaling, another default), the numbers
  change and `tests/test_main_job_results.py` says the results are stale.
  """
  import jax
  import jax.numpy as jnp
  import optax

  key = jax.random.key(0)
  params = {
    "b": jnp.zeros(8),
    "w": jax.random.normal(key, (12, 8)) / 4,
    "v": jax.random.normal(jax.random.fold_in(key, 1), (8, 12)) / 4,
  }
  tx = example_utils.make_optimizer(
    name, learning_rate=example_utils.default_lr(name), total_steps=400
  )
  state = tx.init(params)
  new = params
  for i in range(3):
    grads = jax.tree.map(
      lambda p, i=i: (
        jax.random.normal(jax.random.fold_in(key, 10 + i), p.shape) * (1 + i)
      ),
      params,
    )
    updates, state = tx.update(grads, state, new)
    new = optax.apply_updates(new, updates)
  return [float(jnp.abs(new[k] - params[k]).sum()) for k in sorted(params)]


def provenance(argv: list[str], names: list[str]) -> dict[str, Any]:
  """What produced a results file: command, date, versions, commit."""
  import jax

  import htmuon_jax

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*cmd: str) -> Optional[str]:
    try:
      return subprocess.run(
        ["git", *cmd],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
      ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return None

  status = git("status", "--porcelain", "--untracked-files=no")
  return {
    "command": shlex.join(["python", "examples/compare.py", *argv]),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M UTC"
    ),
    "htmuon_jax": htmuon_jax.__version__,
    "git_commit": git("rev-parse", "HEAD"),
    "git_dirty": None if status is None else bool(status),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "optimizer_fingerprints": {n: optimizer_fingerprint(n) for n in names},
  }


def _with_alpha_every(task: str, extra: list[str], xmin: str) -> list[str]:
  """Adds `--alpha-every steps // 10` unless the user chose a period."""
  extra = [*extra, "--alpha-xmin", xmin]
  if any(a.split("=")[0] == "--alpha-every" for a in extra):
    return extra
  args = _script(task).parser().parse_args(["--optimizer", "htmuon", *extra])
  return [*extra, "--alpha-every", str(max(1, args.steps // 10))]


def final_alphas(result: dict[str, Any]) -> dict[str, list[Any]]:
  dims = result["dimension_numbers"]
  return {
    rule: diagnostics.layer_alphas(
      result["params"], weight_dimension_numbers=dims, xmin=rule
    )
    for rule in ("ks", "median")
  }


def unit_of(task: str, config: dict[str, Any]) -> str:
  return compare_plots.loss_unit(config) if task == "lm" else "nats/example"


def main_sweep(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
  """`--sweep`: learning-rate grid and seeds per optimizer (see sweep.py)."""
  taken = [
    f
    for f in SWEEP_FLAGS + OWN_FLAGS
    if any(a.split("=")[0] == f for a in extra)
  ]
  if taken:
    raise ValueError(f"sweep: {taken} are set by the sweep itself.")
  names = _names(args)
  factors = [float(f) for f in args.lr_factors.split(",") if f.strip()]
  seeds = [int(s) for s in args.sweep_seeds.split(",") if s.strip()]
  grids = {
    n: sweep.lr_grid(example_utils.default_lr(n), factors) for n in names
  }
  for spec in args.lr_grid:
    name, _, values = spec.partition("=")
    if name not in grids or not values:
      raise ValueError(
        f"lr_grid: expected NAME=LR,LR,... with NAME one of {names}, got "
        f"{spec!r}."
      )
    grids[name] = sweep.lr_grid(1.0, [float(v) for v in values.split(",")])
  extra = _with_alpha_every(args.task, extra, args.alpha_xmin)

  def run_fn(name: str, lr: float, seed: int, path: str) -> dict[str, Any]:
    result = run_one(
      args.task,
      name,
      [*extra, "--lr", repr(lr), "--seed", str(seed)],
      args.out_dir,
      metrics_json=path,
    )
    by_rule = final_alphas(result)
    return sweep.run_record(
      result,
      mean_alpha(by_rule["ks"]),
      mean_alpha(by_rule["median"]),
      unit_of(args.task, result["config"]),
    )

  out = sweep.run_sweep(
    run_fn,
    names,
    grids,
    seeds=seeds,
    out_dir=args.out_dir,
    config={"task": args.task, "extra": extra},
    title="LLaMA-style LM" if args.task == "lm" else "ResNet",
    alpha_xmin=args.alpha_xmin,
    train=not args.report_only,
  )
  print()
  print(out["table"])
  print("plots:", ", ".join(out["plots"]))
  return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  args, extra = parser().parse_known_args(argv)
  if args.sweep:
    return main_sweep(args, extra)
  names = _names(args)
  os.makedirs(args.out_dir, exist_ok=True)
  extra = _with_alpha_every(args.task, extra, args.alpha_xmin)

  init, init_dims = initial_params(args.task, extra)
  alphas_by = {
    "init": diagnostics.layer_alphas(
      init, weight_dimension_numbers=init_dims, xmin=args.alpha_xmin
    )
  }
  rows, histories, failed = [], {}, {}
  made_by = provenance(argv if argv is not None else sys.argv[1:], names)
  unit = "nats"
  title = "LLaMA-style LM" if args.task == "lm" else "ResNet"

  def write() -> tuple[str, list[str]]:
    table = results_table(rows)
    if failed:
      table += "\n\nFailed: " + "; ".join(
        f"{n}: {e}" for n, e in failed.items()
      )
    pngs = (
      plot(histories, alphas_by, args.out_dir, title, args.alpha_xmin, unit)
      if rows
      else []
    )
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
      json.dump(
        {
          "argv": argv if argv is not None else sys.argv[1:],
          "provenance": made_by,
          "results": rows,
          "histories": histories,
          "failed": failed,
          "init_alphas": [r._asdict() for r in alphas_by["init"]],
        },
        f,
        indent=1,
      )
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
      f.write(table + "\n")
    return table, pngs

  for name in names:
    try:
      result = run_one(args.task, name, extra, args.out_dir)
    except Exception as e:  # noqa: BLE001 - reported; the others are kept.
      traceback.print_exc()
      failed[name] = f"{type(e).__name__}: {e}"
      print(f"{name}: failed ({failed[name]}); keeping the other results")
      write()
      continue
    by_rule = final_alphas(result)
    unit = unit_of(args.task, result["config"])
    alphas_by[name] = by_rule[args.alpha_xmin]
    row = {
      "optimizer": name,
      "lr": result["config"]["lr"],
      "final_train_loss": result["final_train_loss"],
      "final_val_loss": result["final_val_loss"],
      "time_per_step_s": result["time_per_step_s"],
      "alpha_ks": mean_alpha(by_rule["ks"]),
      "alpha_median": mean_alpha(by_rule["median"]),
      "alphas": {
        rule: [r._asdict() for r in rs] for rule, rs in by_rule.items()
      },
    }
    if result["val"] and "accuracy" in result["val"][-1]:
      row["val_accuracy"] = result["val"][-1]["accuracy"]
    rows.append(row)
    histories[name] = {
      "train": result["train"],
      "val": result["val"],
      "alpha": result.get("alpha", []),
    }
    write()  # After every optimizer: a later failure loses nothing.

  table, pngs = write()
  print()
  print(table)
  print(
    f"\nmean alpha of the initialization: "
    f"{mean_alpha(alphas_by['init']):.2f} ({args.alpha_xmin} xmin)"
  )
  print("plots:", ", ".join(pngs))
  return {"rows": rows, "table": table, "plots": pngs, "failed": failed}


if __name__ == "__main__":
  try:
    out = main()
  except ValueError as e:  # A bad flag value (names, sweep settings).
    sys.exit(f"error: {e}")
  sys.exit(1 if out.get("failed") else 0)
