#!/usr/bin/env bash
# The main job: sets up the environment if needed, then compares AdamW, Muon,
# HTMuon (and RMNP when available) on a small LLaMA-style model trained on
# the embedded offline text. Extra flags go to examples/compare.py.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
# One OpenBLAS thread: the SVDs here are small, and on a busy machine
# OpenBLAS's spinning threads made a batch of 64x160 SVDs ~40x slower.
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
python examples/compare.py "$@"
