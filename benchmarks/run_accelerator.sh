#!/usr/bin/env bash
# One prepared accelerator run (<= 7 minutes on one GPU, the sum of the
# section budgets below), no install step: the package is imported from this
# checkout (PYTHONPATH=.). Each section runs in its own process under
# `timeout`, so one failure does not stop the rest, and rewrites its JSON in
# $OUT after every row ("complete": false until it ends), so a section cut
# by its budget keeps the rows it finished. HTMUON_ACCEL_SMOKE=1: tiny
# shapes, the same code paths (CPU check, tests/test_run_accelerator.py).
#
#   bash benchmarks/run_accelerator.sh            # -> benchmarks/results/accelerator/
#   OUT=dir bash benchmarks/run_accelerator.sh
#   python benchmarks/summarize_accelerator.py dir
#
# Sections and budgets (seconds): versions 15, smoke 25, spectral 105,
# step 60, race 215 (3 optimizers x HTMUON_RACE_S=45 s of training, plus
# compiles and evaluations). HTMUON_ACCEL_BUDGETS="15 25 105 60 215"
# overrides them. Writes at most 5 JSON files into $OUT.
set -uo pipefail
CALLER="$PWD"
cd "$(dirname "$0")/.."
case "${OUT:-}" in
  "") OUT=benchmarks/results/accelerator ;;  # In the checkout.
  /*) ;;
  *) OUT="$CALLER/$OUT" ;;  # Relative to where it was called from.
esac
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
if [ "${HTMUON_ACCEL_SMOKE:-0}" = 1 ]; then
  DEFAULT="60 90 120 120 200"  # Generous: a shared CI machine is slow.
else
  DEFAULT="15 25 105 60 215"
fi
read -r -a S <<< "${HTMUON_ACCEL_BUDGETS:-$DEFAULT}"
section() {  # name budget_s
  local rc start=$SECONDS
  # TERM at the budget (the JSON keeps the rows done), KILL 5 s later.
  timeout -k 5 "$2" "$PY" benchmarks/accelerator_run.py "$1" "$OUT/$1.json"
  rc=$?
  echo "== section $1: rc $rc after $((SECONDS - start)) of $2 s"
  [ "$rc" = 0 ] || echo "section $1 failed or ran past $2 s (rc $rc)"
}
main() {  # Read whole before it runs: editing the file mid-run is safe.
  echo "== $(date -u +%FT%TZ) sections: versions smoke spectral step race (budgets ${S[*]} s)"
  section versions "${S[0]}"
  section smoke "${S[1]}"
  section spectral "${S[2]}"
  section step "${S[3]}"
  section race "${S[4]}"
  rm -f "$OUT"/.*.json.tmp  # Left only by a kill mid-write.
  echo "== $(date -u +%FT%TZ) wrote $OUT"
  "$PY" benchmarks/summarize_accelerator.py "$OUT" || true
}
main "$@"
exit
