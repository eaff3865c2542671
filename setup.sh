#!/usr/bin/env bash
# Creates .venv with everything cnneb-jax needs (idempotent; fast when already done).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
if ! .venv/bin/python -c "import cnneb_jax, jax, flax, optax, orbax.checkpoint, tensorflow_datasets, tensorboard, pytest, xdist" 2>/dev/null; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e ".[test]"
fi
