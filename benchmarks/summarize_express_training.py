"""Table of the `benchmarks/express_training.sh` runs: val loss per config.

Reads `runs/express_training/<config>_seed<s>.json` (written by
`examples/train_lm.py --metrics-json`) and prints, per config, the final
validation loss of each seed, their mean and sample standard deviation, and
their difference to the svd run of the same seed, and the time per step.

    python benchmarks/summarize_express_training.py [--dir runs/express_training]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics

CONFIGS = {
  "express": 'htmuon p = 0.125, method="express"',
  "svd": 'htmuon p = 0.125, method="svd"',
  "muon": "muon (Newton-Schulz 5 steps, as optax)",
  "exact_muon": 'exact Muon: htmuon p = 0, method="svd", lr 0.01',
}


def main(argv=None) -> str:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dir", default="runs/express_training")
  args = ap.parse_args(argv)
  runs: dict = {}
  for path in sorted(pathlib.Path(args.dir).glob("*_seed*.json")):
    m = re.fullmatch(r"(.+)_seed(\d+)\.json", path.name)
    if not m:
      continue
    r = json.loads(path.read_text())
    runs.setdefault(m.group(1), {})[int(m.group(2))] = r
  lines = [
    "| config | lr | val loss per seed | mean ± std | minus svd, same seed "
    "(mean ± std) | time / step (ms) |",
    "|---|---|---|---|---|---|",
  ]
  for name, label in CONFIGS.items():
    if name not in runs:
      continue
    by_seed = runs[name]
    vals = [by_seed[s]["final_val_loss"] for s in sorted(by_seed)]
    std = statistics.stdev(vals) if len(vals) > 1 else float("nan")
    lr = next(iter(by_seed.values()))["config"]["lr"]
    ms = statistics.mean(1e3 * r["time_per_step_s"] for r in by_seed.values())
    per_seed = ", ".join(
      f"{s}: {by_seed[s]['final_val_loss']:.4f}" for s in sorted(by_seed)
    )
    # Paired by seed: the same initialization and batches as the svd run.
    svd = runs.get("svd", {})
    diffs = [
      by_seed[s]["final_val_loss"] - svd[s]["final_val_loss"]
      for s in sorted(by_seed)
      if s in svd
    ]
    paired = (
      f"{statistics.mean(diffs):+.4f} ± {statistics.stdev(diffs):.4f}"
      if len(diffs) > 1 and name != "svd"
      else ""
    )
    lines.append(
      f"| {label} | {lr:g} | {per_seed} | {statistics.mean(vals):.4f} ± "
      f"{std:.4f} | {paired} | {ms:.0f} |"
    )
  table = "\n".join(lines)
  print(table)
  return table


if __name__ == "__main__":
  main()
