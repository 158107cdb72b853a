"""Compare optimizers on the same model, data, seed and step budget.

Trains the LLaMA-style decoder of `train_lm.py` (or, with `--task resnet`,
the ResNet of `train_resnet.py`) once per optimizer, from the same
initialization and on the same batches, then

* prints a markdown table: final train / validation loss, time per step,
  mean power-law alpha of the weight matrices (both estimators);
* saves `loss_curves.png` (train and validation loss per step) and
  `alphas.png` (per-matrix alpha at the end; the initialization for
  reference) under `--out-dir`, with `results.json` and per-run metrics.

Every flag it does not know is passed on to the training script, e.g.

    python examples/compare.py                         # defaults: a few minutes on 2 CPU cores
    python examples/compare.py --steps 2000 --dim 256 --layers 6 --seq-len 256
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

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import example_utils  # noqa: E402

from htmuon_jax import diagnostics  # noqa: E402

DEFAULT_OPTIMIZERS = ("adamw", "muon", "htmuon", "rmnp")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--task", default="lm", choices=("lm", "resnet"))
  p.add_argument("--optimizers", default=None,
                 help="comma-separated (default: adamw,muon,htmuon and rmnp "
                      "when htmuon_jax has it)")
  p.add_argument("--out-dir", default="runs/compare")
  p.add_argument("--alpha-xmin", default="median", choices=("median", "ks"),
                 help="estimator of the per-layer alpha plot")
  return p


def run_one(task: str, name: str, extra: list[str], out_dir: str
            ) -> dict[str, Any]:
  if task == "lm":
    import train_lm as script
  else:
    import train_resnet as script
  argv = ["--optimizer", name, "--metrics-json",
          os.path.join(out_dir, f"metrics_{name}.json"), *extra]
  # The same flags go to every optimizer: ones it ignores only warn.
  return script.main(argv, ignored_flags="warn")


def initial_params(task: str, extra: list[str]) -> tuple[Any, Any]:
  """The common initialization (same seed as the runs) and its dims."""
  from flax import nnx
  if task == "lm":
    import train_lm as script
    # htmuon takes every optimizer flag (the model does not depend on it).
    args = script.parser().parse_args(["--optimizer", "htmuon", *extra])
    _, model, _, _, dims, _ = script.build(args)
  else:
    import train_resnet as script
    import example_data
    args = script.parser().parse_args(["--optimizer", "adamw", *extra])
    data = example_data.load_images(args.dataset, max_examples=args.max_examples,
                                    seed=args.seed)
    model = script.ResNet(data.train_x.shape[-1], data.num_classes,
                          tuple(int(w) for w in args.widths.split(",")),
                          args.blocks_per_stage, rngs=nnx.Rngs(args.seed))
    dims = lambda p: script.resnet_dimension_numbers(p, split=args.split)
  return nnx.to_pure_dict(nnx.state(model, nnx.Param)), dims


def mean_alpha(rows: list[diagnostics.LayerAlpha]) -> float:
  values = [r.alpha for r in rows if np.isfinite(r.alpha)]
  return float(np.mean(values)) if values else float("nan")


def results_table(rows: list[dict[str, Any]]) -> str:
  has_acc = any("val_accuracy" in r for r in rows)
  head = ("| optimizer | peak lr | final train loss | final val loss | "
          + ("val accuracy | " if has_acc else "")
          + "time / step (ms) | mean alpha (KS xmin) | mean alpha (median xmin) |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    lines.append(
        f"| {r['optimizer']} | {r['lr']:g} | {r['final_train_loss']:.4f} | "
        f"{r['final_val_loss']:.4f} | "
        + (f"{r.get('val_accuracy', float('nan')):.3f} | " if has_acc else "")
        + f"{1e3 * r['time_per_step_s']:.1f} | {r['alpha_ks']:.2f} | "
        f"{r['alpha_median']:.2f} |")
  return "\n".join(lines)


def plot(histories: dict[str, dict[str, Any]],
         alphas: dict[str, list[diagnostics.LayerAlpha]], out_dir: str,
         title: str, xmin: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for i, (name, h) in enumerate(histories.items()):
    color = f"C{i}"
    steps = [p["step"] for p in h["train"]]
    losses = [p["loss"] for p in h["train"]]
    axes[0].plot(steps, losses, color=color, alpha=0.8, label=name)
    vs = [p["step"] for p in h["val"]]
    axes[1].plot(vs, [p["loss"] for p in h["val"]], "o-", color=color,
                 label=name)
  for ax, what in zip(axes, ("train loss", "validation loss")):
    ax.set_xlabel("step")
    ax.set_ylabel(what)
    ax.set_title(f"{title}: {what}")
    ax.legend()
    ax.grid(alpha=0.3)
  # Zoom in on the end of training, where the optimizers differ.
  final = [h["train"][-1]["loss"] for h in histories.values() if h["train"]]
  if final:
    lo = min(min(p["loss"] for p in h["train"]) for h in histories.values())
    axes[0].set_ylim(lo - 0.1, max(final) + 1.5)
  fig.tight_layout()
  loss_png = os.path.join(out_dir, "loss_curves.png")
  fig.savefig(loss_png, dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(11, 4.5))
  diagnostics.plot_layer_alphas(
      alphas, ax=ax,
      title=f"{title}: power-law alpha per weight matrix ({xmin} xmin), "
            "lower = heavier tail")
  fig.tight_layout()
  alpha_png = os.path.join(out_dir, "alphas.png")
  fig.savefig(alpha_png, dpi=120)
  plt.close(fig)
  return [loss_png, alpha_png]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
  args, extra = parser().parse_known_args(argv)
  available = example_utils.available_optimizers()
  if args.optimizers:
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
      raise ValueError(f"optimizers: unknown {unknown}; available: {available}.")
  else:
    names = [n for n in DEFAULT_OPTIMIZERS if n in available]
  os.makedirs(args.out_dir, exist_ok=True)

  init, init_dims = initial_params(args.task, extra)
  alphas_by = {"init": diagnostics.layer_alphas(
      init, weight_dimension_numbers=init_dims, xmin=args.alpha_xmin)}
  rows, histories = [], {}
  for name in names:
    result = run_one(args.task, name, extra, args.out_dir)
    dims = result["dimension_numbers"]
    by_rule = {rule: diagnostics.layer_alphas(
        result["params"], weight_dimension_numbers=dims, xmin=rule)
        for rule in ("ks", "median")}
    alphas_by[name] = by_rule[args.alpha_xmin]
    row = {"optimizer": name, "lr": result["config"]["lr"],
           "final_train_loss": result["final_train_loss"],
           "final_val_loss": result["final_val_loss"],
           "time_per_step_s": result["time_per_step_s"],
           "alpha_ks": mean_alpha(by_rule["ks"]),
           "alpha_median": mean_alpha(by_rule["median"]),
           "alphas": {rule: [r._asdict() for r in rs]
                      for rule, rs in by_rule.items()}}
    if result["val"] and "accuracy" in result["val"][-1]:
      row["val_accuracy"] = result["val"][-1]["accuracy"]
    rows.append(row)
    histories[name] = {"train": result["train"], "val": result["val"]}

  table = results_table(rows)
  title = "LLaMA-style LM" if args.task == "lm" else "ResNet"
  pngs = plot(histories, alphas_by, args.out_dir, title, args.alpha_xmin)
  with open(os.path.join(args.out_dir, "results.json"), "w") as f:
    json.dump({"argv": argv if argv is not None else sys.argv[1:],
               "results": rows, "histories": histories,
               "init_alphas": [r._asdict() for r in alphas_by["init"]]},
              f, indent=1)
  with open(os.path.join(args.out_dir, "results.md"), "w") as f:
    f.write(table + "\n")
  print()
  print(table)
  print(f"\nmean alpha of the initialization: "
        f"{mean_alpha(alphas_by['init']):.2f} ({args.alpha_xmin} xmin)")
  print("plots:", ", ".join(pngs))
  return {"rows": rows, "table": table, "plots": pngs}


if __name__ == "__main__":
  main()
