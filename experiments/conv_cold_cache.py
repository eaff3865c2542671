"""oneDNN's convolutions alone, with warm caches (the same call repeated) and with cold ones
(a 64 MB buffer rewritten between calls), against their time inside the full train step
(experiments/onednn_calls.py): is the step's slowdown its caches, or its concurrency?

    python experiments/conv_cold_cache.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from cnneb_jax import onednn

SHAPES = [((8, 17, 17, 192), (7, 1, 192, 192)), ((8, 17, 17, 192), (1, 7, 192, 192)),
          ((8, 35, 35, 64), (3, 3, 64, 96)), ((8, 35, 35, 48), (5, 5, 48, 64)),
          ((8, 73, 73, 80), (3, 3, 80, 192))]


def main() -> None:
    flush = jax.jit(lambda b: b * 1.0001 + 1.0)
    buf = jnp.ones((16 << 20,), jnp.float32)  # 64 MB, over the L3 these 2 cores share
    print("| x | w | forward warm, ms | forward cold, ms | fwd+bwd warm | fwd+bwd cold |")
    print("|---|---|---:|---:|---:|---:|")
    for xs, ws in SHAPES:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal(xs, np.float32))
        w = jnp.asarray(rng.standard_normal(ws, np.float32) * 0.05)
        fwd = jax.jit(lambda x, w: onednn.conv(x, w, (1, 1), "SAME"))
        both = jax.jit(lambda x, w: jax.grad(lambda x, w: jnp.sum(onednn.conv(x, w, (1, 1), "SAME") ** 2),
                                             (0, 1))(x, w))
        row = []
        for f in (fwd, both):
            for cold in (False, True):
                jax.block_until_ready(f(x, w))
                ts = []
                for _ in range(9):
                    if cold:
                        buf = jax.block_until_ready(flush(buf))
                    t = time.perf_counter()
                    jax.block_until_ready(f(x, w))
                    ts.append((time.perf_counter() - t) * 1e3)
                row.append(float(np.median(ts)))
        print(f"| {xs} | {ws} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} | {row[3]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
