#!/usr/bin/env bash
# The main job: sets up the environment if needed, then compares AdamW, Muon,
# HTMuon (and RMNP when available) on a small LLaMA-style model trained on
# the embedded offline text. Extra flags go to examples/compare.py.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
python examples/compare.py "$@"
