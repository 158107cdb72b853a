#!/usr/bin/env bash
# Lint (ruff check), format check (ruff format --check) and type check (mypy
# on htmuon_jax/), as configured in pyproject.toml. Sets up the environment if
# needed (see _env.sh) and installs the lint extra. Runs all three and fails
# if any fails. `bash scripts/lint.sh --fix` applies ruff's fixes and the
# formatter instead of checking.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
if ! python -c "import ruff, mypy" >/dev/null 2>&1; then
  python -m pip install -q -e ".[lint]"
fi
if [ "${1:-}" = "--fix" ]; then
  python -m ruff check --fix .
  python -m ruff format .
  exit 0
fi
status=0
echo "== ruff check"; python -m ruff check . || status=1
echo "== ruff format --check"; python -m ruff format --check . || status=1
echo "== mypy"; python -m mypy || status=1
exit "$status"
