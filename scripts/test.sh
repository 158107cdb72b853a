#!/usr/bin/env bash
# The test command: sets up the environment if needed, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
# Two xdist workers on a 2-core machine: one BLAS thread each (LAPACK kernels
# behind jnp.linalg.svd/eigh on CPU are ~40x slower when oversubscribed).
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
python -m pytest -q -n 2 --durations=15 "$@"
