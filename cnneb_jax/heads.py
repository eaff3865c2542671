"""Classifier heads (O1 at a branch point, O2 at the end) and the expert branches.

Expert outputs are 2-way logits over {FT, Other}: index FT=0, OTHER=1. The early-exit
rule leaves at a branch point when softmax(expert)[OTHER] > threshold.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnneb_jax.configs import Config
from cnneb_jax.pooling import avg_pool
from cnneb_jax.segments import ConvBN, InceptionA, channels

FT, OTHER = 0, 1


class AuxLayers(nn.Module):
    """The Inception v3 auxiliary-head layers: avgpool, 1x1 conv, kxk conv, global pool.

    Shared shape for O1 and the experts ("O1-like layers"). Returns a feature vector.
    """
    cfg: Config

    @nn.compact
    def __call__(self, x, train: bool):
        cfg = self.cfg
        k = min(cfg.aux_pool, x.shape[1])
        x = avg_pool(x, k, cfg.aux_pool_stride, "VALID", onednn_mode=cfg.onednn)
        x = ConvBN(channels(cfg.aux_channels, cfg.width), (1, 1), bn_momentum=cfg.bn_momentum,
                   onednn_mode=cfg.onednn, name="Conv2d_1b_1x1")(x, train)
        if self.is_initializing():
            k = min(5, x.shape[1])  # TF-slim shrinks the 5x5 kernel on small grids
        else:
            # The kernel was sized for the grid at image_size; a smaller input (progressive
            # resizing) keeps it and zero-pads its map up to it.
            k = next(int(n.rsplit("x", 1)[1]) for n in self.variables["params"]
                     if n.startswith("Conv2d_2a_"))
            short = max(0, k - x.shape[1])
            x = jnp.pad(x, ((0, 0), (short // 2, short - short // 2),
                            (short // 2, short - short // 2), (0, 0)))
        x = ConvBN(channels(cfg.aux_hidden, cfg.width), (k, k), padding="VALID",
                   bn_momentum=cfg.bn_momentum, onednn_mode=cfg.onednn,
                   name=f"Conv2d_2a_{k}x{k}")(x, train)
        return jnp.mean(x, axis=(1, 2))


class AuxHead(nn.Module):
    """O1: the Inception v3 auxiliary classifier, moved to an early branch point."""
    cfg: Config

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = AuxLayers(self.cfg, name="AuxLayers")(x, train)
        return nn.Dense(self.cfg.num_classes, name="Logits")(h)


class MainHead(nn.Module):
    """O2: global average pool, dropout, dense (Keras `predictions`)."""
    cfg: Config

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.mean(x, axis=(1, 2))
        if self.cfg.dropout > 0:
            x = nn.Dropout(self.cfg.dropout, deterministic=not train)(x)
        return nn.Dense(self.cfg.num_classes, name="Logits")(x)


def _decision(h, hidden: int):
    if hidden > 0:
        h = nn.relu(nn.Dense(hidden, name="Hidden")(h))
    return nn.Dense(2, name="Decision")(h)


class ExpertHead(nn.Module):
    """E1, the proposed expert: O1-like layers, concat with O1's output, dense, {FT, Other}.

    `expert_inputs="paper"` (the default) concatenates O1's softmax output. The paper's
    Eq. (5) concatenates x̂_O1, the vector its Eq. (3) feeds to the softmax:
    `expert_inputs="logits"` does that. Both add a hidden layer of `expert_hidden` units
    before the decision (0 leaves it out; Eq. (5) leaves the layers after the concatenation
    open). `"paper+confidence"` (the ablation, config
    `cifar_confidence`) adds O1's logits and three summaries of its softmax (max
    probability, top-2 margin, normalised entropy), which hands E1 the max-softmax score
    it is compared with. The backbone and O1 are
    frozen while E1 trains.
    """
    cfg: Config

    @nn.compact
    def __call__(self, x, o1_logits, train: bool = False):
        h = AuxLayers(self.cfg, name="AuxLayers")(x, train)
        o1 = jax.lax.stop_gradient(o1_logits)
        if self.cfg.expert_inputs == "paper":
            h = jnp.concatenate([h, jax.nn.softmax(o1)], axis=-1)
        elif self.cfg.expert_inputs == "logits":
            h = jnp.concatenate([h, o1], axis=-1)
        else:
            h = jnp.concatenate([h, o1, confidence_features(o1)], axis=-1)
        return _decision(h, self.cfg.expert_hidden)


def confidence_features(logits: jax.Array) -> jax.Array:
    """softmax, max probability, top-2 margin and normalised entropy of a classifier."""
    p = jax.nn.softmax(logits)
    top2 = jax.lax.top_k(p, 2)[0]
    ent = -jnp.sum(p * jnp.log(jnp.clip(p, 1e-12)), -1, keepdims=True) / jnp.log(p.shape[-1])
    return jnp.concatenate([p, top2[:, :1], top2[:, :1] - top2[:, 1:], ent], axis=-1)


class Aux5bExpert(nn.Module):
    """"Auxiliary+5b as Expert": an extra Inception-A block, then the O1-like layers."""
    cfg: Config

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = InceptionA(32, self.cfg.width, self.cfg.bn_momentum, name="Mixed_5b")(x, train)
        h = AuxLayers(self.cfg, name="AuxLayers")(x, train)
        return _decision(h, self.cfg.expert_hidden)
