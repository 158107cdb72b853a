"""Embedding and LM-head policy on the example LM (`examples/train_lm.py`).

Three policies for the token embedding `(vocab, d)` and the LM head
`(d, vocab)`, every other leaf routed as `train_lm.py` routes it:

* `authors`: both are matrices; the embedding with fan-out = vocab (the HTMuon
  authors' PyTorch `nn.Embedding.weight` seen as `(out, in)`, shape factor
  `sqrt(vocab / d)`);
* `spectral`: both are matrices; the embedding read vocab -> d (fan-in =
  vocab, shape factor 1), the one rule `htmuon_jax` uses in every routing;
* `adamw`: both go to AdamW (Keller Jordan's and Moonlight's Muon setups).

    python benchmarks/embedding_policy.py --steps 400

Writes `benchmarks/results/embedding_policy.json` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
from optax.contrib import MuonDimensionNumbers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
sys.path.insert(0, HERE)
import _common  # noqa: E402
import example_utils  # noqa: E402
import train_lm  # noqa: E402

POLICIES = ("authors", "spectral", "adamw")


def policy_dimension_numbers(policy: str):
  def dims(params, *, split="authors", scan=False):
    def rule(path, leaf):
      names = example_utils.path_names(path)
      if names[0] in ("embed", "head"):
        if policy == "adamw":
          return None
        if names[0] == "embed":
          if policy == "authors":
            return MuonDimensionNumbers(reduction_axis=1, output_axis=0)
          return MuonDimensionNumbers(reduction_axis=0, output_axis=1)
      return MuonDimensionNumbers() if jnp.ndim(leaf) == 2 else None

    return jax.tree_util.tree_map_with_path(rule, params)

  return dims


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--optimizers", default="htmuon,muon")
  p.add_argument("--seeds", default="0")
  p.add_argument("--policies", default=",".join(POLICIES))
  p.add_argument("--adam-lr", default=None, help="AdamW branch peak lr")
  p.add_argument(
    "--out", default=os.path.join(_common.RESULTS, "embedding_policy.json")
  )
  args = p.parse_args()
  rows = []
  for opt in args.optimizers.split(","):
    for seed in args.seeds.split(","):
      for policy in args.policies.split(","):
        train_lm.lm_dimension_numbers = policy_dimension_numbers(policy)
        r = train_lm.main(
          [
            "--optimizer",
            opt,
            "--steps",
            str(args.steps),
            "--seed",
            seed,
            "--no-progress",
            "--log-every",
            str(args.steps),
          ]
          + (["--adam-lr", args.adam_lr] if args.adam_lr else [])
        )
        rows.append(
          dict(
            optimizer=opt,
            seed=int(seed),
            policy=policy,
            lr=r["config"]["lr"],
            adam_lr=r["config"]["adam_lr"],
            final_train_loss=float(r["final_train_loss"]),
            final_val_loss=float(r["final_val_loss"]),
          )
        )
        print(json.dumps(rows[-1]), flush=True)
  with open(args.out, "w") as f:
    json.dump(
      dict(machine=_common.machine(), steps=args.steps, rows=rows), f, indent=1
    )
  print(
    "| optimizer | seed | policy | AdamW lr | final train loss | final val loss |"
  )
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['optimizer']} | {r['seed']} | {r['policy']} | {r['adam_lr']} | "
      f"{r['final_train_loss']:.4f} | {r['final_val_loss']:.4f} |"
    )


if __name__ == "__main__":
  main()
