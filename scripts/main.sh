#!/usr/bin/env bash
# The main job: sets up the environment if needed, then trains a small model
# with HTMuon on the embedded default data and prints the losses.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
python examples/quickstart.py "$@"
