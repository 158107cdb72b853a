#!/usr/bin/env bash
# One prepared accelerator run (<= 8 minutes on one GPU), no install step:
# the package is imported from this checkout (PYTHONPATH=.). Each section
# runs in its own process under `timeout`, so one failure does not stop the
# rest, and writes its JSON into $OUT as soon as it ends. HTMUON_ACCEL_SMOKE=1:
# tiny shapes, the same code paths (CPU check, tests/test_run_accelerator.py).
#
#   OUT=dir bash benchmarks/run_accelerator.sh
#   python benchmarks/summarize_accelerator.py dir
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/accelerator}"
PY="${PYTHON:-python}"
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
if [ "${HTMUON_ACCEL_SMOKE:-0}" = 1 ]; then S=(30 60 60 60); else S=(60 30 210 120); fi
section() {  # name budget_s
  timeout "$2" "$PY" benchmarks/accelerator_run.py "$1" "$OUT/$1.json" \
    || echo "section $1 failed or ran past $2 s (rc $?)"
}
section versions "${S[0]}"
cat "$OUT/versions.json" 2>/dev/null | head -30
section smoke "${S[1]}"
section spectral "${S[2]}"
section step "${S[3]}"
echo "wrote $OUT"
