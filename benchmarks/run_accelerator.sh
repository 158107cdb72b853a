#!/usr/bin/env bash
# Spectral-step cost and one optimizer step on a GPU or TPU machine.
#
# Runs, on JAX's default backend (an accelerator where there is one):
#   1. benchmarks/accelerator_cost.py: HLO-based estimates for every method
#      and precision, plus wall-clock ratios to optax muon's Newton-Schulz
#      measured on this backend at 1024^2, 2048^2, 4096^2 and the LLaMA-60M
#      matrix set;
#   2. benchmarks/optimizer_step.py: one full optimizer step on the LLaMA-60M
#      matrices (with embeddings), every method and precision, vs
#      optax.contrib.muon.
# JSON goes to benchmarks/results/accelerator/ (override with OUT=dir).
# Never needed by CI or the tests.
#
#   bash benchmarks/run_accelerator.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/accelerator}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
"$PY" -c "import jax; print('backend:', jax.default_backend(), jax.devices())"
"$PY" benchmarks/accelerator_cost.py \
  --cpu-shapes 1024^2 2048^2 4096^2 LLaMA-60M \
  --out "$OUT/accelerator_cost.json"
"$PY" benchmarks/optimizer_step.py --models llama-60m --with-embeddings \
  --fast --methods htmuon-polynomial,htmuon-polynomial-fast,htmuon-svd,muon-newton_schulz-fast \
  --out "$OUT/optimizer_step.json"
echo "wrote $OUT"
