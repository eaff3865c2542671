"""Seconds to initialise a config's variables from an empty compilation cache: eagerly, as
`model.init_variables` does (op by op), or as one jitted program. Session 23 kept eager
(docs/experiments.md §19): the jitted program, mostly random-number code, compiled slower.

    XLA_FLAGS=--xla_backend_optimization_level=0 python experiments/init_jit.py tiny eager
    XLA_FLAGS=--xla_backend_optimization_level=0 python experiments/init_jit.py tiny jit
    python experiments/init_jit.py tiny jit --check    # also: the same bits as eager?
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp()   # cold, as the suite starts
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cnneb_jax.configs import get_config  # noqa: E402
from cnneb_jax.model import build_model, init_variables  # noqa: E402


def main(argv: list[str]) -> None:
    name, mode = argv[0], argv[1]
    cfg = get_config(name)
    if cfg.num_classes == 0:
        cfg = cfg.replace(num_classes=10)
    model = build_model(cfg)
    t = time.perf_counter()
    if mode == "eager":
        v = init_variables(model, jax.random.PRNGKey(0))
    else:
        v = jax.jit(lambda r: init_variables(model, r))(jax.random.PRNGKey(0))
    jax.block_until_ready(v)
    print(f"{name} {mode}: {time.perf_counter() - t:.1f} s "
          f"(XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r})")
    if "--check" in argv:
        a = init_variables(model, jax.random.PRNGKey(0))
        same = all(np.array_equal(x, y) for x, y in
                   zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(v)))
        print(f"the same bits as eager: {same}")


if __name__ == "__main__":
    main(sys.argv[1:])
