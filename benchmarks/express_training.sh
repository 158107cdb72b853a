#!/usr/bin/env bash
# Training evidence for method="express" (issue #31): the main job's LM
# (examples/train_lm.py defaults: dim 64, 4 layers, 400 steps, pydoc text)
# with 3 seeds and the paper's learning rates, one run at a time:
#   htmuon (p = 0.125, lr 0.03) with method express and with method svd,
#   muon (Newton-Schulz, as optax; lr 0.01),
#   exact Muon: htmuon power 0, method svd, at Muon's lr 0.01.
# Writes runs/express_training/<config>_seed<s>.json (skips finished runs);
# summarize with benchmarks/summarize_express_training.py.
#
#   OPENBLAS_NUM_THREADS=1 nice -n 10 bash benchmarks/express_training.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# This checkout's package, whatever else is installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
OUT="${OUT:-runs/express_training}"
SEEDS="${SEEDS:-0 1 2}"
mkdir -p "$OUT"
run() {
  local name="$1" seed="$2"
  shift 2
  local json="$OUT/${name}_seed${seed}.json"
  if [[ -f "$json" ]]; then return; fi
  echo "== $name seed $seed: $*"
  "$PY" examples/train_lm.py --seed "$seed" --no-progress --log-every 100 \
    --metrics-json "$json.tmp" "$@"
  mv "$json.tmp" "$json"
}
# Seed-major: a run cut short still leaves every config at the same seeds.
for seed in $SEEDS; do
  for only in ${CONFIGS:-express svd muon exact_muon}; do
    case "$only" in
      express) run express "$seed" --optimizer htmuon --method express ;;
      svd) run svd "$seed" --optimizer htmuon --method svd ;;
      muon) run muon "$seed" --optimizer muon ;;
      exact_muon)
        run exact_muon "$seed" --optimizer htmuon --power 0 --method svd \
          --lr 0.01 ;;
    esac
  done
done
