"""Markdown tables from the JSON of `benchmarks/run_accelerator.sh`.

  python benchmarks/summarize_accelerator.py OUT_DIR

Measured columns (time, compile, the process's peak device memory so far,
race losses and tokens/s) beside the estimates (XLA's memory estimate of the
compiled call; compute-bound H100 time from the HLO and published peak
rates). A section cut by its time budget or an error shows the rows it
finished and says so.
"""

from __future__ import annotations

import json
import pathlib
import sys


def _mib(b) -> str:
  return "-" if b is None else f"{b / 2**20:.0f}"


def _ms(s) -> str:
  return "-" if s is None else f"{1e3 * s:.3f}"


TABLES = (
  (
    "smoke",
    "| method | backend | dtype | finite |\n|---|---|---|---|",
    lambda r: (
      f"| {r['method']} | {r['backend']} | {r['dtype']} | {r['finite']} |"
    ),
  ),
  (
    "spectral",
    "| shapes | method | measured ms | compile s | peak MiB so far | XLA est. "
    "MiB | est. H100 ms (HLO) |\n|---|---|---:|---:|---:|---:|---:|",
    lambda r: (
      f"| {r['set']} | {r['method']} | {1e3 * r['time_s']:.3f} | "
      f"{r['compile_s']:.1f} | {_mib(r['peak_bytes_so_far'])} | "
      f"{_mib(r['xla_bytes'])} | "
      f"{_ms(r['est_h100_s'])} |"
    ),
  ),
  (
    "step",
    "| model | scanned | optimizer | measured ms | compile s | peak MiB so "
    "far | XLA est. MiB |\n|---|---|---|---:|---:|---:|---:|",
    lambda r: (
      f"| {r['model']} | {r['scanned']} | {r['optimizer']} | "
      f"{1e3 * r['time_s']:.2f} | {r['compile_s']:.1f} | "
      f"{_mib(r['peak_bytes_so_far'])} | {_mib(r['xla_bytes'])} |"
    ),
  ),
  (
    "race",
    "| optimizer | train s | steps | tokens/s | train loss | val loss | "
    "best val loss | compile s |\n|---|---:|---:|---:|---:|---:|---:|---:|",
    lambda r: (
      f"| {r['optimizer']}{'' if r['final'] else ' (not finished)'} | "
      f"{r['train_s']:.0f} | {r['steps']} | {r['tokens_per_s']:,.0f} | "
      f"{r['train_loss']:.3f} | {r['val_loss']:.3f} | "
      f"{r['best_val_loss']:.3f} | {r['compile_s']:.1f} |"
    ),
  ),
)


def _race_rows(rows: list) -> list:
  """The last row of each optimizer (its final one where it finished)."""
  last: dict = {}
  for r in rows:
    last[r["optimizer"]] = r
  return list(last.values())


def render(out_dir: str) -> str:
  d = pathlib.Path(out_dir)
  lines = []
  v = d / "versions.json"
  if v.exists():
    j = json.loads(v.read_text())
    lines.append(
      f"Device {j.get('device')}; jax {j.get('jax')}, jaxlib "
      f"{j.get('jaxlib')}, optax {j.get('optax')}, flax {j.get('flax')}"
      + (" (smoke mode)" if j.get("smoke") else "")
    )
    lines.append("")
  for name, head, fmt in TABLES:
    f = d / f"{name}.json"
    lines.append(f"### {name}")
    lines.append("")
    if not f.exists():
      lines += ["(no result: the section did not start)", ""]
      continue
    j = json.loads(f.read_text())
    rows = j.get("rows", [])
    if name == "race":
      rows = _race_rows(rows)
      if "model" in j:
        lines += [
          f"Model {j['model']}, data {j['data']}, {j['budget_s']:.0f} s of "
          "training per optimizer.",
          "",
        ]
    if not j.get("complete"):
      why = j.get("error") or "stopped by its time budget"
      lines += [f"(partial: {why}; {len(j.get('rows', []))} rows kept)", ""]
    if rows:
      lines.append(head)
      lines += [fmt(r) for r in rows]
    lines.append("")
  return "\n".join(lines)


if __name__ == "__main__":
  print(render(sys.argv[1]))
