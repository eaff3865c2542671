"""JAX's persistent compilation cache, on by default for loading a cascade, and memoised
facts about a config beside it.

`api.load` compiles every program routing can reach (about 150 for the cifar config with
buckets up to 256); with the cache a second load in a new process reads them from disk
instead of compiling them. Each program is still lowered first (the cache is keyed by its
lowered form), which is why the controller traces each branch program once with a symbolic
batch size and lowers that for every bucket. Serialized executables
(jax.experimental.serialize_executable) would skip lowering too, but on XLA:CPU some of ours
failed when called after loading ("Function ... fusion not found"), so they are not used.
Folder: $CNNEB_COMPILE_CACHE, else JAX_COMPILATION_CACHE_DIR if the user set one, else
~/.cache/cnneb_jax/xla (or $CNNEB_CACHE/xla). CNNEB_COMPILE_CACHE=off (or 0) turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax

from cnneb_jax.cache import cache_root

OFF = ("0", "off", "false", "no")


def cache_dir() -> Path | None:
    """The folder the cache would use, or None when it is turned off."""
    env = os.environ.get("CNNEB_COMPILE_CACHE")
    if env is not None and env.strip().lower() in OFF:
        return None
    if env:
        return Path(env)
    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    return cache_root() / "xla"


def enable() -> Path | None:
    """Turns the cache on (idempotent); returns its folder or None when off. Every program
    is cached, however quick to compile: the cascade's are many and small."""
    d = cache_dir()
    if d is None:
        return None
    d.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return d



# Code whose change invalidates memoised facts (shapes, FLOPs, traced programs) about a config.
# The traced programs call oneDNN's FFI handlers by name with attributes: a changed kernel
# source must not find programs traced against the old one.
_FACT_SOURCES = ("configs.py", "model.py", "segments.py", "heads.py", "metrics.py",
                 "controller.py", "pooling.py", "onednn.py", "native/onednn_conv.cc")


def memo(kind: str, key: str, compute: Callable[[], bytes], decode: Callable[[bytes], Any]) -> Any:
    """`decode(compute())`, with the bytes memoised in the cache folder under a digest of
    `kind`, `key`, the JAX and Flax versions and the model code's source, so that what a
    load needs about a config (variable shapes, FLOPs, the traced branch programs) is
    computed once per config, not per process. Computed afresh when the cache is off, and
    computed and rewritten when the file cannot be read or decoded."""
    d = cache_dir()
    if d is None:
        return decode(compute())
    import flax
    h = hashlib.sha256(f"{kind}\0{key}\0{jax.__version__}\0{flax.__version__}".encode())
    here = Path(__file__).parent
    for name in _FACT_SOURCES:
        h.update((here / name).read_bytes())
    path = d / "cnneb-facts" / f"{kind}-{h.hexdigest()[:32]}"
    try:
        return decode(path.read_bytes())
    except Exception:   # missing, unreadable or damaged: decoders raise many types
        pass
    blob = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)   # atomic: a concurrent reader sees the old file or the whole new one
    return decode(blob)


def memo_json(kind: str, key: str, compute: Callable[[], Any]) -> Any:
    """`compute()` (JSON-serialisable), memoised as `memo` does."""
    return memo(kind, key, lambda: json.dumps(compute()).encode(), json.loads)
