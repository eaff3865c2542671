"""Max and average pooling over square windows, written as strided slices.

`lax.reduce_window` (what `flax.linen.max_pool` / `avg_pool` lower to) runs 3-14x slower on
XLA:CPU than the same reduction written as k strided slices per axis, rows first, then
columns; and its gradients are worse still (max pooling's `select_and_scatter`): the `full`
config's pools take 74 ms forward and 577 ms for their gradients at batch 8 as
reduce_window, 19 and 187 ms as slices (`experiments/conv_lowering.py --pools`, docs/experiments.md
§14). The slices give the same maxima exactly and the same averages up to float rounding;
their gradients are elementwise. Padding follows
`lax.padtype_to_pads` ("SAME": the extra pixel goes after), as Flax's and TF's do
(`onednn.axis_pads`, shared with the convs).

With oneDNN (cnneb_jax/onednn.py) its pooling kernels run instead, forward and backward
(faster still: docs/experiments.md §15 for inference, §30 for training).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cnneb_jax import onednn


def _reduce(x: jax.Array, k: int, s: int, padding: str, op, fill) -> jax.Array:
    pads = [onednn.axis_pads(x.shape[a], k, s, padding) for a in (1, 2)]
    if any(lo or hi for _, lo, hi in pads):
        x = jnp.pad(x, ((0, 0), *((lo, hi) for _, lo, hi in pads), (0, 0)),
                    constant_values=fill)
    for axis, (out, _, _) in zip((1, 2), pads):
        taps = [jax.lax.slice_in_dim(x, i, i + s * (out - 1) + 1, s, axis) for i in range(k)]
        x = functools.reduce(op, taps)
    return x


def _max_slices(x: jax.Array, k: int, s: int, padding: str) -> jax.Array:
    return _reduce(x, k, s, padding, jnp.maximum, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _onednn_pool(x, k: int, s: int, padding: str, average: bool):
    pads, out_hw = _pads(x.shape, k, s, padding)
    return onednn.pool(x, k, s, pads, out_hw, average)


def _pads(shape, k: int, s: int, padding: str):
    """(((top, bottom), (left, right)), (out h, out w)) of a pool over NHWC `shape`."""
    axes = [onednn.axis_pads(shape[a], k, s, padding) for a in (1, 2)]
    return tuple((lo, hi) for _, lo, hi in axes), tuple(out for out, _, _ in axes)


def _onednn_pool_fwd(x, k, s, padding, average):
    # Differentiated (training): max pooling keeps oneDNN's workspace (where each maximum
    # came from) for its gradient; average pooling needs only the input's shape, carried by
    # an empty array.
    pads, out_hw = _pads(x.shape, k, s, padding)
    shape = jnp.zeros((*x.shape[:3], 0), x.dtype)
    if average:
        return onednn.pool(x, k, s, pads, out_hw, True, exclusive=True), (None, shape)
    y, workspace = onednn.max_pool_train(x, k, s, pads, out_hw)
    return y, (workspace, shape)


def _onednn_pool_bwd(k, s, padding, average, res, dy):
    workspace, shape = res
    x_shape = (*shape.shape[:3], dy.shape[3])
    pads, _ = _pads(x_shape, k, s, padding)
    return (onednn.pool_grad(dy, workspace, x_shape, k, s, pads, average),)


_onednn_pool.defvjp(_onednn_pool_fwd, _onednn_pool_bwd)


def max_pool(x: jax.Array, k: int, s: int, padding: str, onednn_mode: str = "off") -> jax.Array:
    """k x k max pooling with stride s over NHWC (`onednn_mode`: see onednn.use)."""
    if onednn.use(onednn_mode, x.dtype):
        return _onednn_pool(x, k, s, padding, False)
    return _max_slices(x, k, s, padding)


def _counts(size: int, k: int, s: int, padding: str) -> np.ndarray:
    """How many real (unpadded) pixels each window covers along one axis."""
    out, lo, _ = onednn.axis_pads(size, k, s, padding)
    starts = np.arange(out) * s - lo
    return np.minimum(starts + k, size) - np.maximum(starts, 0)


def avg_pool(x: jax.Array, k: int, s: int, padding: str, count_include_pad: bool = True,
             onednn_mode: str = "off") -> jax.Array:
    """k x k average pooling with stride s over NHWC. With `count_include_pad=False` each
    window divides by its real pixels only (TF's SAME average pooling)."""
    # oneDNN's average leaves padding out of the count: fine unless padding is counted
    padded = any(lo or hi for _, lo, hi in (onednn.axis_pads(x.shape[a], k, s, padding)
                                            for a in (1, 2)))
    if onednn.use(onednn_mode, x.dtype) and not (count_include_pad and padded):
        return _onednn_pool(x, k, s, padding, True)
    return _avg_slices(x, k, s, padding, count_include_pad)


def _avg_slices(x: jax.Array, k: int, s: int, padding: str,
                count_include_pad: bool) -> jax.Array:
    total = _reduce(x, k, s, padding, jnp.add, 0)
    if count_include_pad or padding == "VALID":
        return total * jnp.asarray(1 / (k * k), x.dtype)
    n = np.outer(_counts(x.shape[1], k, s, padding), _counts(x.shape[2], k, s, padding))
    return total * jnp.asarray(1 / n[None, :, :, None], x.dtype)
