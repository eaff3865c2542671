#!/usr/bin/env bash
# Creates .venv with everything cnneb-jax needs (idempotent; fast when already done).
# Python 3.12 or 3.13 (JAX >= 0.12 needs 3.12+): $CNNEB_PYTHON if set, else python3.12,
# python3.13 or pyenv's 3.12/3.13 (on these machines: ~/.pyenv/versions/3.12.1), else python3.
# Versions come from constraints.txt, the ones the tests and figures were measured with.
set -euo pipefail
cd "$(dirname "$0")"
supported='import sys; sys.exit(not (3, 12) <= sys.version_info[:2] <= (3, 13))'
find_python() {
  local c
  for c in "${CNNEB_PYTHON:-}" python3.12 python3.13 "$HOME"/.pyenv/versions/3.12*/bin/python \
           "$HOME"/.pyenv/versions/3.13*/bin/python python3; do
    if [ -n "$c" ] && "$c" -c "$supported" 2>/dev/null; then echo "$c"; return 0; fi
  done
  echo "setup.sh: no Python 3.12 or 3.13 found (set CNNEB_PYTHON=/path/to/python3.12)" >&2
  return 1
}
if [ -x .venv/bin/python ] && ! .venv/bin/python -c "$supported" 2>/dev/null; then
  echo "setup.sh: .venv has $(.venv/bin/python --version 2>&1); recreating it with Python 3.12+"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  py=$(find_python)
  echo "setup.sh: creating .venv with $py ($("$py" --version 2>&1))"
  "$py" -m venv .venv
fi
if ! .venv/bin/python -c "import cnneb_jax, jax, flax, optax, orbax.checkpoint, tensorflow_datasets, tensorboard, keras, pytest, xdist" 2>/dev/null; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -c constraints.txt -e ".[test]"
fi
# oneDNN's CPU kernels (cnneb_jax/onednn.py): downloaded from the package registry and
# compiled once (about 10 s); without them every config runs XLA's (slower) kernels.
.venv/bin/python -m cnneb_jax.onednn || echo "setup.sh: continuing with XLA's kernels"
