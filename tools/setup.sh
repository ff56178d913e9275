#!/usr/bin/env bash
# One command that sets everything up on a fresh machine: a Python 3.12 venv in .venv with dsv4-jax
# (editable) and its dev extras. Usage: bash tools/setup.sh   (then: source .venv/bin/activate)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.12}"
if ! "$PY" --version >/dev/null 2>&1; then
  # pyenv installs python3.12 but only runs it when told the version.
  if command -v pyenv >/dev/null 2>&1; then
    PYENV_VERSION="$(pyenv versions --bare | grep '^3\.12' | tail -1)"
    export PYENV_VERSION
  fi
fi
"$PY" --version >/dev/null 2>&1 || { echo "setup: need Python 3.12 (python3.12 not found)" >&2; exit 1; }
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import jax, flax, dsv4_jax; print('dsv4-jax ready: jax', jax.__version__, 'flax', flax.__version__)"
