"""Experts trained on cached branch-point features (issue 11, items 1-3).

The backbone is frozen while experts train, so what an expert at branch point i reads (the
feature map there and O_i's logits) and its FT/Other target depend only on the image and
its augmentation. `cache_views` computes them once for a fixed set of augmented views of
the held-out images; `train_expert` then trains any expert kind from that cache, as the
expert stage does (Adam, warm-up then linear decay, class-balanced cross-entropy, one view
per epoch), at the cost of the expert alone. That makes learning-rate choices on the
calibration split and several seeds per expert cheap.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnneb_jax import checkpoints, data as data_lib
from cnneb_jax.augment import augment, normalize
from cnneb_jax.heads import FT, OTHER
from cnneb_jax.metrics import ft_labels, roc_auc
from cnneb_jax.model import (Model, Variables, backbone_forward, expert_forward,
                             split_collections)
from cnneb_jax.expert_stage import balanced_expert_loss, class_weights
from cnneb_jax.optim import make_optimizer
from cnneb_jax.pipeline import materialize
from cnneb_jax.workdir import load_trained

KINDS = ("experts", "aux5b")


def add_source_flags(p, experts: dict) -> None:
    """The flags every expert experiment shares: the trained workdir, its images and which
    of `experts` to train."""
    p.add_argument("--workdir", default="pretrained/cifar")
    p.add_argument("--data-dir", required=True, help="the image folder the workdir was trained on")
    p.add_argument("--experts", default=",".join(experts),
                   help=f"comma-separated, from: {', '.join(experts)}")


def load_source(workdir: str, data_dir: str) -> tuple:
    """(config, dataset, model, frozen backbone variables, held-out images, their labels):
    what an expert experiment reads from a trained workdir and its image folder."""
    cfg = checkpoints.load_config(Path(workdir))
    d = data_lib.load_dataset(cfg, data_dir)
    model, full = load_trained(workdir)
    backbone = {k: full[k] for k in ("segments", "heads")}
    return (cfg, d, model, backbone, np.asarray(materialize(d["val_images"])),
            np.asarray(d["val_labels"]))


def chosen_experts(p, names: str, experts: dict) -> list[str]:
    """--experts as a list, or a usage error naming the choices."""
    chosen = [n.strip() for n in names.split(",")]
    unknown = [n for n in chosen if n not in experts]
    if unknown:
        p.error(f"unknown experts {unknown}; choose from {list(experts)}")
    return chosen


def _forward_fn(model: Model):
    @functools.partial(jax.jit, static_argnames="pad")
    def forward(variables, images, rng, pad):
        params, stats = split_collections(variables)
        x = images if pad is None else augment(rng, images, pad)
        logits, feats, _ = backbone_forward(model, params, stats, normalize(x, model.cfg.input_norm), train=False)
        return feats[:-1], logits
    return forward


def cache_views(model: Model, backbone: Variables, images: np.ndarray, labels: np.ndarray,
                views: int = 1, pad: int | None = None, seed: int = 0, batch_size: int = 256,
                dtype: Any = np.float32) -> dict:
    """Branch-point features, exit logits and FT targets of `views` views of `images`.

    With `pad=None` every view is the image itself (use views=1: the calibration and test
    splits); otherwise each view is a random crop (zero padding `pad`) with a random flip,
    the expert stage's augmentation. Returns {"feats": [(views*N, H, W, C) per branch
    point], "logits": [(views*N, classes) per exit], "is_ft": [(views*N,) per branch point],
    "views": views}; row v*N + j is view v of image j. Feature maps are stored as `dtype`
    (float16 halves the memory of many training views)."""
    forward = _forward_fn(model)
    n = len(images)
    key = jax.random.PRNGKey(seed)
    feats: list[list[np.ndarray]] = []
    logits: list[list[np.ndarray]] = []
    for v in range(views):
        for s in range(0, n, batch_size):
            batch = images[s:s + batch_size]
            short = batch_size - len(batch)
            if short:  # one compiled shape for every batch
                batch = np.concatenate([batch, np.zeros((short,) + batch.shape[1:], batch.dtype)])
            f, o = forward(backbone, jnp.asarray(batch), jax.random.fold_in(key, v * n + s), pad)
            keep = len(batch) - short
            f = [np.asarray(a[:keep]).astype(dtype) for a in f]
            o = [np.asarray(a[:keep]) for a in o]
            if not feats:
                feats, logits = [[] for _ in f], [[] for _ in o]
            for acc, a in zip(feats, f):
                acc.append(a)
            for acc, a in zip(logits, o):
                acc.append(a)
    out_logits = [np.concatenate(a) for a in logits]
    preds = [o.argmax(-1) for o in out_logits]
    all_labels = np.tile(labels, views)
    return {"feats": [np.concatenate(a) for a in feats], "logits": out_logits,
            "is_ft": [ft_labels(preds, all_labels, i).astype(bool) for i in range(len(feats))],
            "views": views}


def init_expert(model: Model, kind: str, index: int, seed: int, feat_shape: tuple,
                backbone: Variables | None = None) -> Variables:
    """Fresh variables of one expert ({"params", "batch_stats"}). With `backbone`, the
    expert starts from trained layers of the same shape instead of random weights: E1's
    O1-like layers from O_i's own (so it starts from the features O_i classifies with), and
    an Auxiliary+5b expert's Inception-A block from the backbone's next Inception-A block
    (Mixed_5c: same input width; its pool branch is cut to the expert's width)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    name = f"E{index + 1}"
    x = jnp.zeros((1,) + tuple(feat_shape[1:]), jnp.float32)
    rng = jax.random.PRNGKey(seed)
    if kind == "experts":
        o = jnp.zeros((1, model.cfg.num_classes), jnp.float32)
        variables = model.experts[name].init(rng, x, o)
    else:
        variables = model.aux5b[name].init(rng, x)
    if backbone is not None and kind == "aux5b":
        variables = _warm_start_block(variables, backbone)
    elif backbone is not None:
        head = backbone["heads"][f"O{index + 1}"]
        variables = {col: {**variables[col], "AuxLayers": head[col]["AuxLayers"]}
                     for col in variables}
    return jax.tree_util.tree_map(jnp.asarray, variables)


def _find_block(tree: Any, name: str) -> tuple[dict, dict] | None:
    """(params, batch_stats) of the first sub-module called `name` in a segment's tree."""
    if isinstance(tree, dict):
        if name in tree.get("params", {}):
            return tree["params"][name], tree.get("batch_stats", {}).get(name, {})
        for v in tree.values():
            found = _find_block(v, name)
            if found is not None:
                return found
    return None


def _warm_start_block(variables: Variables, backbone: Variables) -> Variables:
    found = _find_block(backbone["segments"], "Mixed_5c")
    if found is None:
        raise ValueError("the backbone has no Mixed_5c block to start the Auxiliary+5b "
                         "expert from")
    src = {"params": found[0], "batch_stats": found[1]}

    def take(dst, s):
        # Same layer names; the pool branch is narrower in the expert: keep its first
        # output channels.
        if dst.shape == s.shape:
            return jnp.asarray(s)
        return jnp.asarray(s)[..., :dst.shape[-1]]
    out = {k: dict(v) for k, v in variables.items()}
    for col in ("params", "batch_stats"):
        out[col]["Mixed_5b"] = jax.tree_util.tree_map(take, variables[col]["Mixed_5b"],
                                                      src[col])
    return out


def _step_fn(model: Model, kind: str, index: int, tx: optax.GradientTransformation):
    name = f"E{index + 1}"

    @jax.jit
    def step(state, feat, o_logits, is_ft, class_w):
        def loss_fn(params):
            e_logits, new_stats = expert_forward(
                model, {kind: {name: params}}, {kind: {name: state["stats"]}}, kind, index,
                feat.astype(jnp.float32), o_logits, train=True)
            target = jnp.where(is_ft, FT, OTHER)
            return balanced_expert_loss(e_logits, target, class_w), new_stats
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "stats": new_stats,
                "opt": opt}, loss
    return step


def _epoch_fn(model: Model, kind: str, index: int, tx: optax.GradientTransformation):
    """One epoch as one call: the step scanned over an epoch's batches, the features
    gathered on the device from the whole cache (passed in, not captured)."""
    step = _step_fn(model, kind, index, tx)

    @jax.jit
    def epoch(state, feats, logits, is_ft, rows, class_w):
        def body(state, r):
            return step(state, feats[r], logits[r], is_ft[r], class_w)
        return jax.lax.scan(body, state, rows)
    return epoch


def train_expert(model: Model, cache: dict, kind: str, index: int, lr: float, epochs: int,
                 batch_size: int, seed: int, weight_decay: float,
                 class_w: np.ndarray | None = None,
                 init: Variables | None = None,
                 images: np.ndarray | None = None) -> Variables:
    """One expert trained on a `cache_views` cache: epoch e reads view e mod views, in an
    order drawn from (seed, epoch). Returns its eval variables {"params"[, "batch_stats"]}.
    `class_w` defaults to balanced weights from the cache's FT rate. `images` (indices of
    the cached images) trains on those images' views alone: a cross-validation fold."""
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1 and lr > 0 "
                         f"(got {epochs}, {batch_size}, {lr})")
    feats, logits, is_ft = cache["feats"][index], cache["logits"][index], cache["is_ft"][index]
    views = cache["views"]
    n_all = len(is_ft) // views
    images = np.arange(n_all) if images is None else np.asarray(images)
    n = len(images)
    bs = min(batch_size, n)
    steps_per_epoch = n // bs
    total = epochs * steps_per_epoch
    variables = init if init is not None else init_expert(model, kind, index, seed, feats.shape)
    params, stats = variables["params"], variables.get("batch_stats", {})
    tx = make_optimizer(lr, total, total // 20, weight_decay, None)
    state = {"params": params, "stats": stats, "opt": tx.init(params)}
    epoch_fn = _epoch_fn(model, kind, index, tx)
    w = jnp.asarray(class_weights(is_ft) if class_w is None else class_w)
    # The cache goes to the device once and each epoch is one call, faster than a call per
    # step and the same parameters bit for bit (experiments/expert_fit_speed.py).
    on_device = [jax.device_put(a) for a in (feats, logits, is_ft)]
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)[:steps_per_epoch * bs]
        base = (epoch % views) * n_all
        rows = (base + images[order]).reshape(steps_per_epoch, bs).astype(np.int32)
        state, _ = epoch_fn(state, *on_device, rows, w)
    out = {"params": state["params"]}
    if state["stats"]:
        out["batch_stats"] = state["stats"]
    return out


def expert_scores(model: Model, variables: Variables, cache: dict, kind: str, index: int,
                  batch_size: int = 1000) -> np.ndarray:
    """P(Other) of one expert on every row of a cache (eval mode)."""
    name = f"E{index + 1}"

    @jax.jit
    def score(variables, feat, o_logits):
        params = {kind: {name: variables["params"]}}
        stats = {kind: {name: variables.get("batch_stats", {})}}
        e, _ = expert_forward(model, params, stats, kind, index, feat.astype(jnp.float32),
                              o_logits, train=False)
        return jax.nn.softmax(e, -1)[:, OTHER]
    feats, logits = cache["feats"][index], cache["logits"][index]
    return np.concatenate([np.asarray(score(variables, feats[s:s + batch_size],
                                            logits[s:s + batch_size]))
                           for s in range(0, len(feats), batch_size)])


def auc(scores: np.ndarray, cache: dict, index: int) -> float:
    """ROC AUC of scores for Other (positive) against FT on a cache's rows."""
    return roc_auc(scores, ~cache["is_ft"][index])


def max_softmax(cache: dict, index: int) -> np.ndarray:
    """O_i's max softmax on a cache's rows ("Auxiliary as Expert")."""
    return np.asarray(jax.nn.softmax(cache["logits"][index], -1).max(-1))
