"""Seconds for the tiny config's backbone stage with an empty compilation cache, as the
test suite first meets it: run it once with and once without LLVM level 0 to see what
tests/conftest.py's XLA flag saves.

    python experiments/cold_tiny_stage.py
    XLA_FLAGS=--xla_backend_optimization_level=0 python experiments/cold_tiny_stage.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp()   # cold: compile everything
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import make_image_folder  # noqa: E402
from cnneb_jax.backbone_stage import train_backbone  # noqa: E402
from cnneb_jax.configs import get_config  # noqa: E402
from cnneb_jax.data import load_dataset  # noqa: E402

root = Path(tempfile.mkdtemp())
cfg = get_config("tiny")
data = load_dataset(cfg, str(make_image_folder(root / "folder")), root / "cache")
t = time.perf_counter()
train_backbone(cfg, data, root / "workdir")
print(f"cold tiny backbone stage: {time.perf_counter() - t:.1f} s "
      f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
