"""Forward, input-gradient and weight-gradient time of the CIFAR config's stride-2 convs.

    python experiments/conv_grads.py

jax#31662 and openxla/xla#34273 report transposed-conv (input) gradients of strided convs
up to 30x slower than PyTorch on CPU. This prints, for the four stride-2 3x3 convs of the
`cifar` config (Mixed_6a and Mixed_7a, batch 256), the median time of the forward conv, of
XLA's input gradient and weight gradient, and of a matmul-per-tap formulation of each
gradient, with the largest difference from XLA's, to show whether that path is worth
replacing here. The whole train step takes about 0.8 s per 128 images
(bench/train_throughput.py).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

_DN = ("NHWC", "HWIO", "NHWC")


def conv_s2(x, w):
    return jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=_DN)


def dx_taps(dy, w, h):
    """Input gradient as one matmul per tap, added into a strided view (SAME, even h:
    the input is padded by one row/column at the end)."""
    kh, kw, _, _ = w.shape
    acc = jnp.zeros((dy.shape[0], h + 1, h + 1, w.shape[2]), dy.dtype)
    for i in range(kh):
        for j in range(kw):
            acc = acc.at[:, i:i + h:2, j:j + h:2, :].add(jnp.dot(dy, w[i, j].T))
    return acc[:, :h, :h, :]


def dw_taps(x, dy):
    h, cin, cout = x.shape[1], x.shape[-1], dy.shape[-1]
    xp = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    d2 = dy.reshape(-1, cout)
    taps = [jnp.dot(xp[:, i:i + h:2, j:j + h:2, :].reshape(-1, cin).T, d2)
            for i in range(3) for j in range(3)]
    return jnp.stack(taps).reshape(3, 3, cin, cout)


def median_ms(fn, *args, repeats: int = 7) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    # (grid, in, out) of Mixed_6a's two and Mixed_7a's two stride-2 convs at width 0.25.
    shapes = [(16, 72, 96), (16, 96, 96), (8, 48, 80), (8, 48, 48)]
    print("| conv (grid, in->out) | fwd ms | dx ms (XLA) | dw ms (XLA) | dx ms (taps) "
          "| dw ms (taps) | max diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for h, cin, cout in shapes:
        x = jnp.asarray(rng.standard_normal((args.batch, h, h, cin)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.05, jnp.float32)
        dy = jnp.asarray(rng.standard_normal((args.batch, h // 2, h // 2, cout)), jnp.float32)
        xla_dx = lambda dy, w: jax.vjp(lambda x_: conv_s2(x_, w), x)[1](dy)[0]
        xla_dw = lambda x, dy: jax.vjp(lambda w_: conv_s2(x, w_), w)[1](dy)[0]
        diff = max(float(jnp.abs(xla_dx(dy, w) - dx_taps(dy, w, h)).max()),
                   float(jnp.abs(xla_dw(x, dy) - dw_taps(x, dy)).max()))
        print(f"| {h}x{h}, {cin}->{cout} | {median_ms(conv_s2, x, w):.1f} | "
              f"{median_ms(xla_dx, dy, w):.1f} | {median_ms(xla_dw, x, dy):.1f} | "
              f"{median_ms(lambda dy, w: dx_taps(dy, w, h), dy, w):.1f} | "
              f"{median_ms(dw_taps, x, dy):.1f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
