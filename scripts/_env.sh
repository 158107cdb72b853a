# Sourced by the scripts in this folder: makes sure a Python environment with
# the project installed (editable, with the test and example extras) is active.
# Uses the active virtual environment if there is one, else ./.venv (created
# on first use).
if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  . .venv/bin/activate
fi
if ! python -c "import htmuon_jax, pytest, flax, orbax.checkpoint, xdist" >/dev/null 2>&1; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[test]"
fi
