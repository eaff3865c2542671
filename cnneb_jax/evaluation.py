"""Evaluation: every exit's and expert's outputs over a whole split, in one jit per batch
(split over all devices), and the exits' accuracies. For measuring heads and experts in
training and reports; the early-exit controller (controller.py) runs segments instead."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from cnneb_jax import distributed as dist
from cnneb_jax import pipeline
from cnneb_jax.augment import normalize
from cnneb_jax.configs import Config
from cnneb_jax.model import (Model, Variables, backbone_forward, build_model, expert_forward,
                             split_collections)


def make_predict_fn(model: Model):
    """Eval-mode outputs of every exit and expert for a batch (one jit, for evaluation).

    The early-exit controller uses the per-segment functions instead; this one computes
    everything and is only for measuring heads and experts. One function per config in a
    process: a stage, the next stage and a load of the same config share its traces (a
    trace of the tiny model costs about as much as running it on a split).
    """
    return _predict_for(model.cfg)


@functools.lru_cache(maxsize=8)
def _predict_for(cfg: Config):
    model = build_model(cfg)   # a Model is a pure function of its config
    m = model.num_exits

    @jax.jit
    def predict(variables, images):
        params, stats = split_collections(variables)
        x = normalize(images, model.cfg.input_norm)
        logits, feats, _ = backbone_forward(model, params, stats, x, train=False)
        out = {"exits": logits}
        if "experts" in params and params["experts"]:
            out["experts"] = [expert_forward(model, params, stats, "experts", i, feats[i],
                                             logits[i], False)[0] for i in range(m - 1)]
            out["aux5b"] = [expert_forward(model, params, stats, "aux5b", i, feats[i],
                                           logits[i], False)[0] for i in range(m - 1)]
        return out

    return predict


def predict_all(model: Model, variables: Variables, images: np.ndarray, batch_size: int,
                desc: str | None = None, predict=None) -> dict[str, list[np.ndarray]]:
    """Runs `make_predict_fn` over a whole split; pads the last batch to a fixed shape.
    Pass `predict` (from `make_predict_fn`) to reuse its compilation across calls."""
    predict = predict or make_predict_fn(model)
    mesh = dist.data_mesh()
    variables = dist.replicate(mesh, variables)
    # Batches are split over all devices: round the batch up to a multiple of their count.
    batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
    chunks: list[Any] = []
    n = len(images)
    rows = [np.arange(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    stream = pipeline.batches(images, np.zeros(n, np.int32), rows, train=False)
    for batch, _ in tqdm(stream, total=len(rows), desc=desc, leave=False, disable=desc is None):
        pad = batch_size - len(batch)
        if pad:
            batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
        out = dist.to_host(predict(variables, *dist.shard_batch(mesh, batch)))
        chunks.append(jax.tree_util.tree_map(lambda a: a[:len(a) - pad] if pad else a, out))
    return {k: [np.concatenate([c[k][i] for c in chunks]) for i in range(len(chunks[0][k]))]
            for k in chunks[0]}


def exit_accuracies(outputs: dict, labels: np.ndarray) -> dict[str, float]:
    return {f"O{i + 1}": float((o.argmax(-1) == labels).mean())
            for i, o in enumerate(outputs["exits"])}
