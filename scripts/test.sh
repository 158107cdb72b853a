#!/usr/bin/env bash
# The test command: sets up the environment if needed, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
python -m pytest -q -n 2 --durations=15 "$@"
