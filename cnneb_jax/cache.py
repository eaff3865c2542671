"""Where cnneb_jax keeps what it can rebuild: decoded images (data.py), compiled programs
(compile_cache.py) and the operating points of read-only releases (api.py)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The user's cache folder: $CNNEB_CACHE, else ~/.cache/cnneb_jax (read when called)."""
    return Path(os.environ.get("CNNEB_CACHE", Path.home() / ".cache" / "cnneb_jax"))
