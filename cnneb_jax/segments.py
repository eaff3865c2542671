"""Inception v3 backbone in Flax, cut into segments at the branch points.

A segment runs the blocks strictly after `start` up to and including `end`
(`start=None` means from the image). Layer shapes follow Keras/TF-slim Inception v3:
conv without bias, BatchNorm without scale (eps 1e-3), ReLU.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnneb_jax import onednn
from cnneb_jax.configs import BLOCKS, Config
from cnneb_jax.pooling import avg_pool, max_pool


def channels(c: int, width: float) -> int:
    """Scales a channel count; narrow nets round to multiples of 8 (cheaper on CPU/GPU)."""
    if width == 1.0:
        return c
    return max(8, int(round(c * width / 8)) * 8)


_DN = ("NHWC", "HWIO", "NHWC")
_BN_EPS = 1e-3


def _conv(x, w, strides: int, padding: str):
    return jax.lax.conv_general_dilated(x, w, (strides, strides), padding, dimension_numbers=_DN)


class Conv(nn.Module):
    """Bias-free conv with an HWIO kernel (the shapes of nn.Conv / Keras Conv2D).

    With oneDNN (`onednn_mode`, cnneb_jax/onednn.py) every conv runs oneDNN's kernels,
    forward and backward, 1x1 convs included: as XLA matmuls they ran beside oneDNN's calls
    and slowed them (docs/experiments.md §30). Without oneDNN, 1x1 convs run as XLA matmuls
    (same numbers as lax.conv up to float rounding; faster on XLA:CPU than its conv,
    experiments/conv_lowering.py).

    `bn` = (scale, offset) turns it into relu(conv(x, w) * scale + offset) in one oneDNN
    primitive: inference BatchNorm and ReLU fused into the conv.
    """
    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: str = "SAME"
    onednn_mode: str = "off"

    @nn.compact
    def __call__(self, x, bn: tuple[jax.Array, jax.Array] | None = None):
        cin = x.shape[-1]
        w = self.param("kernel", nn.initializers.lecun_normal(),
                       (*self.kernel_size, cin, self.features))
        x = x.astype(w.dtype)  # mixed precision: the kernel arrives already cast (bf16)
        strides = (self.strides, self.strides)
        if bn is not None:
            scale, offset = bn
            return onednn.conv_affine_relu(x, w, scale, offset, strides=strides,
                                           padding=self.padding, relu=True, cache_kernel=True)
        if onednn.use(self.onednn_mode, x.dtype, training=True):
            return onednn.conv(x, w, strides, self.padding)
        if self.kernel_size == (1, 1) and self.strides == 1:
            return jnp.dot(x, w.reshape(cin, self.features))
        return _conv(x, w, self.strides, self.padding)


def _bn_variables(module: nn.Module, features: int):
    """(offset, running mean, running variance) of nn.BatchNorm(use_scale=False), declared
    in `module` under the same names with the same initial values; the statistics as Flax
    variables (readable and writable)."""
    bias = module.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    mean = module.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    var = module.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    return bias, mean, var


class BatchNormStats(nn.Module):
    """The variables of nn.BatchNorm(use_scale=False), handed back instead of applied:
    (offset, running mean, running variance)."""
    features: int

    @nn.compact
    def __call__(self):
        bias, mean, var = _bn_variables(self, self.features)
        return bias, mean.value, var.value


class BatchNormReLU(nn.Module):
    """Training-mode nn.BatchNorm(use_scale=False) then ReLU, as one oneDNN primitive each
    way (onednn.batchnorm_relu): the same variables under the same names, the running
    statistics updated as Flax does (biased batch variance)."""
    momentum: float

    @nn.compact
    def __call__(self, x):
        bias, ra_mean, ra_var = _bn_variables(self, x.shape[-1])
        y, mean, var = onednn.batchnorm_relu(x, bias, _BN_EPS)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
            ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
        return y


class ConvBN(nn.Module):
    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: str = "SAME"
    bn_momentum: float = 0.9
    onednn_mode: str = "off"

    @nn.compact
    def __call__(self, x, train: bool):
        conv = Conv(self.features, self.kernel, self.strides, self.padding,
                    self.onednn_mode, name="conv")
        # The conv computes in its kernel's dtype (float64 in some tests: XLA's). At init
        # there is no kernel yet: XLA's path creates the same variables.
        kernel = self.variables.get("params", {}).get("conv", {}).get("kernel")
        if not train and kernel is not None and onednn.use(self.onednn_mode, kernel.dtype):
            # Inference: BatchNorm's running statistics and ReLU fused into the conv.
            bias, mean, var = BatchNormStats(self.features, name="bn")()
            scale = jax.lax.rsqrt(var.astype(jnp.float32) + _BN_EPS)
            return conv(x, bn=(scale, bias.astype(jnp.float32) - mean * scale))
        x = conv(x)
        if train and onednn.use(self.onednn_mode, x.dtype, training=True):
            # training: BatchNorm and ReLU in one oneDNN primitive each way
            return BatchNormReLU(self.bn_momentum, name="bn")(x)
        x = nn.BatchNorm(use_running_average=not train, use_scale=False, epsilon=_BN_EPS,
                         momentum=self.bn_momentum, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x, onednn_mode: str):
    # TF's SAME average pooling divides by the number of real (unpadded) inputs.
    return avg_pool(x, 3, 1, "SAME", count_include_pad=False, onednn_mode=onednn_mode)


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
    pool_features: int
    width: float
    bn_momentum: float = 0.9
    onednn_mode: str = "off"

    @nn.compact
    def __call__(self, x, train: bool):
        c = lambda n: channels(n, self.width)
        conv = lambda f, k, name: ConvBN(c(f), k, bn_momentum=self.bn_momentum,
                                      onednn_mode=self.onednn_mode, name=name)
        b0 = conv(64, (1, 1), "Branch_0_Conv2d_0a_1x1")(x, train)
        b1 = conv(48, (1, 1), "Branch_1_Conv2d_0a_1x1")(x, train)
        b1 = conv(64, (5, 5), "Branch_1_Conv2d_0b_5x5")(b1, train)
        b2 = conv(64, (1, 1), "Branch_2_Conv2d_0a_1x1")(x, train)
        b2 = conv(96, (3, 3), "Branch_2_Conv2d_0b_3x3")(b2, train)
        b2 = conv(96, (3, 3), "Branch_2_Conv2d_0c_3x3")(b2, train)
        pooled = _avg_pool_same(x, self.onednn_mode)
        b3 = conv(self.pool_features, (1, 1), "Branch_3_Conv2d_0b_1x1")(pooled, train)
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17 (16 -> 8 on CIFAR)."""
    width: float
    padding: str
    bn_momentum: float = 0.9
    onednn_mode: str = "off"

    @nn.compact
    def __call__(self, x, train: bool):
        c = lambda n: channels(n, self.width)
        conv = lambda f, k, s, pad, name: ConvBN(f, k, s, pad, self.bn_momentum,
                                                 self.onednn_mode, name=name)
        b0 = conv(c(384), (3, 3), 2, self.padding, "Branch_0_Conv2d_1a_3x3")(x, train)
        b1 = conv(c(64), (1, 1), 1, "SAME", "Branch_1_Conv2d_0a_1x1")(x, train)
        b1 = conv(c(96), (3, 3), 1, "SAME", "Branch_1_Conv2d_0b_3x3")(b1, train)
        b1 = conv(c(96), (3, 3), 2, self.padding, "Branch_1_Conv2d_1a_1x1")(b1, train)
        b2 = max_pool(x, 3, 2, self.padding, self.onednn_mode)
        return jnp.concatenate([b0, b1, b2], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 convolutions."""
    channels_7x7: int
    width: float
    bn_momentum: float = 0.9
    onednn_mode: str = "off"

    @nn.compact
    def __call__(self, x, train: bool):
        c = lambda n: channels(n, self.width)
        conv = lambda f, k, name: ConvBN(f, k, bn_momentum=self.bn_momentum,
                                      onednn_mode=self.onednn_mode, name=name)
        c7 = c(self.channels_7x7)
        b0 = conv(c(192), (1, 1), "Branch_0_Conv2d_0a_1x1")(x, train)
        b1 = conv(c7, (1, 1), "Branch_1_Conv2d_0a_1x1")(x, train)
        b1 = conv(c7, (1, 7), "Branch_1_Conv2d_0b_1x7")(b1, train)
        b1 = conv(c(192), (7, 1), "Branch_1_Conv2d_0c_7x1")(b1, train)
        b2 = conv(c7, (1, 1), "Branch_2_Conv2d_0a_1x1")(x, train)
        b2 = conv(c7, (7, 1), "Branch_2_Conv2d_0b_7x1")(b2, train)
        b2 = conv(c7, (1, 7), "Branch_2_Conv2d_0c_1x7")(b2, train)
        b2 = conv(c7, (7, 1), "Branch_2_Conv2d_0d_7x1")(b2, train)
        b2 = conv(c(192), (1, 7), "Branch_2_Conv2d_0e_1x7")(b2, train)
        pooled = _avg_pool_same(x, self.onednn_mode)
        b3 = conv(c(192), (1, 1), "Branch_3_Conv2d_0b_1x1")(pooled, train)
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8 (8 -> 4 on CIFAR)."""
    width: float
    padding: str
    bn_momentum: float = 0.9
    onednn_mode: str = "off"

    @nn.compact
    def __call__(self, x, train: bool):
        c = lambda n: channels(n, self.width)
        conv = lambda f, k, s, pad, name: ConvBN(f, k, s, pad, self.bn_momentum,
                                                 self.onednn_mode, name=name)
        b0 = conv(c(192), (1, 1), 1, "SAME", "Branch_0_Conv2d_0a_1x1")(x, train)
        b0 = conv(c(320), (3, 3), 2, self.padding, "Branch_0_Conv2d_1a_3x3")(b0, train)
        b1 = conv(c(192), (1, 1), 1, "SAME", "Branch_1_Conv2d_0a_1x1")(x, train)
        b1 = conv(c(192), (1, 7), 1, "SAME", "Branch_1_Conv2d_0b_1x7")(b1, train)
        b1 = conv(c(192), (7, 1), 1, "SAME", "Branch_1_Conv2d_0c_7x1")(b1, train)
        b1 = conv(c(192), (3, 3), 2, self.padding, "Branch_1_Conv2d_1a_3x3")(b1, train)
        b2 = max_pool(x, 3, 2, self.padding, self.onednn_mode)
        return jnp.concatenate([b0, b1, b2], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/7c: expanded filter banks."""
    width: float
    bn_momentum: float = 0.9
    onednn_mode: str = "off"

    @nn.compact
    def __call__(self, x, train: bool):
        c = lambda n: channels(n, self.width)
        conv = lambda f, k, name: ConvBN(c(f), k, bn_momentum=self.bn_momentum,
                                      onednn_mode=self.onednn_mode, name=name)
        b0 = conv(320, (1, 1), "Branch_0_Conv2d_0a_1x1")(x, train)
        b1 = conv(384, (1, 1), "Branch_1_Conv2d_0a_1x1")(x, train)
        b1 = jnp.concatenate([conv(384, (1, 3), "Branch_1_Conv2d_0b_1x3")(b1, train),
                              conv(384, (3, 1), "Branch_1_Conv2d_0c_3x1")(b1, train)], -1)
        b2 = conv(448, (1, 1), "Branch_2_Conv2d_0a_1x1")(x, train)
        b2 = conv(384, (3, 3), "Branch_2_Conv2d_0b_3x3")(b2, train)
        b2 = jnp.concatenate([conv(384, (1, 3), "Branch_2_Conv2d_0c_1x3")(b2, train),
                              conv(384, (3, 1), "Branch_2_Conv2d_0d_3x1")(b2, train)], -1)
        pooled = _avg_pool_same(x, self.onednn_mode)
        b3 = conv(192, (1, 1), "Branch_3_Conv2d_0b_1x1")(pooled, train)
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


def make_block(name: str, cfg: Config) -> nn.Module:
    """One named Inception v3 block (or a plain function for the pools)."""
    w, pad, m, impl = cfg.width, cfg.padding, cfg.bn_momentum, cfg.onednn
    if name.startswith("Mixed_6"):
        w = cfg.width_6 or w
    elif name.startswith("Mixed_7"):
        w = cfg.width_7 or w
    c = lambda n: channels(n, w)
    stem = {
        "Conv2d_1a_3x3": lambda: ConvBN(cfg.stem_channels or c(32), (3, 3), cfg.stem_stride,
                                        pad, m, impl, name=name),
        "Conv2d_2a_3x3": lambda: ConvBN(c(32), (3, 3), 1, pad, m, impl, name=name),
        "Conv2d_2b_3x3": lambda: ConvBN(c(64), (3, 3), 1, "SAME", m, impl, name=name),
        "Conv2d_3b_1x1": lambda: ConvBN(c(80), (1, 1), 1, pad, m, impl, name=name),
        "Conv2d_4a_3x3": lambda: ConvBN(c(192), (3, 3), 1, pad, m, impl, name=name),
    }
    if name in stem:
        return stem[name]()
    if name.startswith("Mixed_5"):
        return InceptionA(32 if name == "Mixed_5b" else 64, w, m, impl, name=name)
    if name == "Mixed_6a":
        return InceptionB(w, pad, m, impl, name=name)
    if name.startswith("Mixed_6"):
        c7 = {"Mixed_6b": 128, "Mixed_6c": 160, "Mixed_6d": 160, "Mixed_6e": 192}[name]
        return InceptionC(c7, w, m, impl, name=name)
    if name == "Mixed_7a":
        return InceptionD(w, pad, m, impl, name=name)
    if name.startswith("Mixed_7"):
        return InceptionE(w, m, impl, name=name)
    raise ValueError(f"not a parametrised block: {name}")


def segment_blocks(start: str | None, end: str | None) -> Sequence[str]:
    """Block names strictly after `start` up to and including `end` (None: ends)."""
    i = 0 if start is None else BLOCKS.index(start) + 1
    j = len(BLOCKS) if end is None else BLOCKS.index(end) + 1
    return BLOCKS[i:j]


class Segment(nn.Module):
    """A contiguous run of backbone blocks, e.g. stem -> Mixed_5b or Mixed_5b -> end."""
    cfg: Config
    start: str | None
    end: str | None

    @nn.compact
    def __call__(self, x, train: bool = False):
        for name in segment_blocks(self.start, self.end):
            if name in self.cfg.skip_blocks:
                continue
            if name == "MaxPool_3a_3x3":
                x = max_pool(x, 3, 2, self.cfg.padding, self.cfg.onednn)
            elif name == "MaxPool_5a_3x3":
                if self.cfg.use_pool_5a:
                    x = max_pool(x, 3, 2, self.cfg.padding, self.cfg.onednn)
            else:
                x = make_block(name, self.cfg)(x, train)
        return x
