"""Markdown tables from the JSON of `benchmarks/run_accelerator.sh`.

  python benchmarks/summarize_accelerator.py OUT_DIR

Measured columns (time, compile, peak memory) beside the HLO-based
estimate (compute-bound H100 time from published peak rates).
"""

from __future__ import annotations

import json
import pathlib
import sys


def _mib(b) -> str:
  return "-" if b is None else f"{b / 2**20:.0f}"


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
  for name, head, fmt in (
    (
      "smoke",
      "| method | backend | dtype | finite |\n|---|---|---|---|",
      lambda r: (
        f"| {r['method']} | {r['backend']} | {r['dtype']} | {r['finite']} |"
      ),
    ),
    (
      "spectral",
      "| shapes | method | measured ms | compile s | peak MiB | est. H100 "
      "ms (HLO) |\n|---|---|---:|---:|---:|---:|",
      lambda r: (
        f"| {r['set']} | {r['method']} | {1e3 * r['time_s']:.3f} | "
        f"{r['compile_s']:.1f} | {_mib(r['peak_bytes'])} | "
        f"{1e3 * r['est_h100_s']:.3f} |"
      ),
    ),
    (
      "step",
      "| model | scanned | optimizer | measured ms | compile s | peak MiB |"
      "\n|---|---|---|---:|---:|---:|",
      lambda r: (
        f"| {r['model']} | {r['scanned']} | {r['optimizer']} | "
        f"{1e3 * r['time_s']:.2f} | {r['compile_s']:.1f} | "
        f"{_mib(r['peak_bytes'])} |"
      ),
    ),
  ):
    f = d / f"{name}.json"
    lines.append(f"### {name}")
    lines.append("")
    if not f.exists():
      lines += ["(no result: the section failed or ran out of time)", ""]
      continue
    lines.append(head)
    lines += [fmt(r) for r in json.loads(f.read_text())["rows"]]
    lines.append("")
  return "\n".join(lines)


if __name__ == "__main__":
  print(render(sys.argv[1]))
