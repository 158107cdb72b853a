#!/usr/bin/env bash
# Builds the documentation site (MkDocs + mkdocstrings: the API reference is
# generated from the docstrings) into site/, with warnings as errors. Sets up
# the environment if needed (see _env.sh) and installs the docs extra.
# `bash scripts/docs.sh serve` serves it locally instead.
set -euo pipefail
export NO_MKDOCS_2_WARNING=1  # a theme notice, not about this site
cd "$(dirname "$0")/.."
. scripts/_env.sh
if ! python -c "import mkdocs, mkdocstrings, mkdocstrings_handlers.python, material" >/dev/null 2>&1; then
  python -m pip install -q -e ".[docs]"
fi
if [ "${1:-}" = "serve" ]; then
  exec python -m mkdocs serve
fi
python -m mkdocs build --strict "$@"
