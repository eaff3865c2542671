"""What happens to images on their way into the network: input normalisation, the train
step's augmentation (random crop with padding, horizontal flip), and airbench's alternating
flips. Pure JAX and numpy: importing it loads neither TensorFlow nor any data source."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Per-channel CIFAR-10 statistics; close enough for any natural-image dataset.
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32) * 255
STD = np.array([0.2470, 0.2435, 0.2616], np.float32) * 255


INPUT_NORMS = ("cifar", "inception")


def normalize(images: jax.Array, mode: str = "cifar") -> jax.Array:
    """uint8 (or float in [0, 255]) NHWC -> float32: "cifar" standardises each channel with
    CIFAR-10's mean and deviation; "inception" scales to [-1, 1], as Keras' Inception v3
    (`preprocess_input`) and weights imported from it expect."""
    if mode == "inception":
        return images.astype(jnp.float32) / 127.5 - 1.0
    if mode != "cifar":
        raise ValueError(f"unknown input_norm {mode!r}; one of {INPUT_NORMS}")
    return (images.astype(jnp.float32) - MEAN) / STD


def augment(rng: jax.Array, images: jax.Array, pad: int, flip: bool = True,
            pad_mode: str = "zeros") -> jax.Array:
    """Random crop with `pad` pixels of padding (`pad_mode` "zeros" or "reflect"), then (if
    `flip`) a random horizontal flip. With `flip=False` the caller flips, e.g. by
    `alternating_flips`."""
    n, h, w, _ = images.shape
    k1, k2 = jax.random.split(rng)
    if pad > 0:
        mode = {"zeros": "constant", "reflect": "reflect"}[pad_mode]
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
        offsets = jax.random.randint(k1, (n, 2), 0, 2 * pad + 1)
        crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1]))
        images = jax.vmap(crop)(padded, offsets)
    if not flip:
        return images
    mirror = jax.random.bernoulli(k2, 0.5, (n, 1, 1, 1))
    return jnp.where(mirror, images[:, :, ::-1, :], images)


def alternating_flips(seed: int, n: int, epoch: int) -> np.ndarray:
    """Which of `n` training images to mirror in `epoch`: a random half in epoch 0, then
    each image alternates, so every image is seen both ways in any two consecutive
    epochs (airbench's "alternating flip"; random flips repeat an orientation half the
    time). Depends only on (seed, epoch): a resumed run mirrors the same images."""
    first = np.random.default_rng([seed, 7919]).integers(0, 2, n).astype(bool)
    return first ^ bool(epoch % 2)
