"""Metrics: accuracy, FT/Other labels, ROC AUC, XLA FLOPs per segment."""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def ft_labels(exit_preds: list[np.ndarray], labels: np.ndarray, i: int) -> np.ndarray:
    """FT at exit i: O_i is wrong AND a later exit gets it right (the paper's "false here,
    true higher up"). Returns 1 for FT, 0 for Other. numpy or jax arrays (a jitted step's)."""
    wrong_here = exit_preds[i] != labels
    # `False` to start from: the last exit has no later one (all Other), as before.
    right_later = functools.reduce(operator.or_, [p == labels for p in exit_preds[i + 1:]],
                                   False)
    return (wrong_here & right_later).astype(np.int32)


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    scores = np.asarray(scores, np.float64)
    pos = np.asarray(positives).astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def xla_flops(fn: Callable, *args: Any) -> float:
    """FLOPs of one call of `fn(*args)` as counted by XLA's cost analysis of its CPU
    compilation, whatever the default backend: XLA:GPU hands convolutions to cuDNN as custom
    calls, which its cost analysis counts as no FLOPs (on an H100 the deep segment counted
    36.7 of its 103.1 MFLOPs, docs/experiments.md section 7)."""
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:   # JAX_PLATFORMS without cpu: count on the default backend
        cpu = None
    with jax.default_device(cpu):
        cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per device
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def segment_flops(model, variables) -> dict[str, float]:
    """XLA FLOPs per image of every segment, exit and expert (batch of 1, eval mode).

    Keys: "seg:<name>", "head:O<i>", "expert:E<i>", "aux5b:E<i>" (as in model.segment_fns).
    Only shapes matter: `variables` may be abstract (`jax.eval_shape` of `init_variables`),
    which skips the slow eager initialisation of a large model.
    """
    cfg = model.cfg
    if cfg.onednn != "off":
        # XLA counts no FLOPs inside oneDNN's kernels (custom calls): count XLA's own.
        from cnneb_jax.model import build_model  # model imports nothing from here
        model = build_model(dataclasses.replace(cfg, onednn="off"))
    x = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    out: dict[str, float] = {}
    feats = []
    for name, seg in model.segments.items():
        v = variables["segments"][name]
        out[f"seg:{name}"] = xla_flops(lambda v, x, m=seg: m.apply(v, x), v, x)
        x = jax.eval_shape(seg.apply, v, x)
        feats.append(x)
    for i, (name, head) in enumerate(model.heads.items()):
        out[f"head:{name}"] = xla_flops(lambda v, h, m=head: m.apply(v, h),
                                        variables["heads"][name], feats[i])
    o = jax.ShapeDtypeStruct((1, cfg.num_classes), jnp.float32)
    for i, name in enumerate(model.experts):
        out[f"expert:{name}"] = xla_flops(lambda v, h, o, m=model.experts[name]: m.apply(v, h, o),
                                          variables["experts"][name], feats[i], o)
        out[f"aux5b:{name}"] = xla_flops(lambda v, h, m=model.aux5b[name]: m.apply(v, h),
                                         variables["aux5b"][name], feats[i])
    return out


def prefix_share(flops: dict[str, float]) -> float:
    """Share of the first segment + O1 + E1 in the cost of the whole network with E1."""
    keys = list(flops)
    first = [k for k in keys if k.startswith("seg:")][0]
    pre = flops[first] + flops["head:O1"] + flops["expert:E1"]
    last_head = [k for k in keys if k.startswith("head:")][-1]
    total = sum(flops[k] for k in keys if k.startswith("seg:")) + flops["head:O1"] \
        + flops["expert:E1"] + flops[last_head]
    return pre / total
