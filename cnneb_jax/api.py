"""The programmatic API.

    from cnneb_jax import api
    cascade = api.load("runs/cifar")
    out = api.predict(cascade, images, rule="expert", threshold=0.9)
    out["labels"], out["probs"], out["exit"], out["flops"]
    point = api.calibrate(cascade, val_images, val_labels, rule="expert", max_drop=0.01)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnneb_jax import serving
from cnneb_jax.controller import (RULES, Cascade, all_outputs, last_exit_flops, make_cascade,
                                  path_flops, run_cascade, softmax_np, warm_up)
from cnneb_jax.sweep import choose_threshold, sweep_rule


def load(workdir: str | Path, max_batch: int = 256, warm: bool = True) -> Cascade:
    """A trained workdir (both stages finished) as a ready-to-route cascade. `warm`
    compiles every bucket size now, so that no call compiles later."""
    from cnneb_jax.stages import load_trained
    model, variables = load_trained(workdir)
    cascade = make_cascade(model, variables, max_batch)
    if warm:
        warm_up(cascade)
    return cascade


def check_images(images, image_size: int) -> np.ndarray:
    """uint8 in [0, 255] or float in [0, 1], shape (N, H, W, 3) or one (H, W, 3) image.
    Returns float32 in [0, 255] with a batch axis; raises ValueError on anything else.
    The same function checks what `serving.predict` is given: one input convention."""
    return serving.check_images(images, (image_size, image_size, 3))


def _check_rule(rule: str, threshold: float | None = None) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
    if threshold is not None and not (0.0 <= float(threshold) <= 1.0):
        raise ValueError(f"threshold must lie in [0, 1]; got {threshold}")


def predict(cascade: Cascade, images, rule: str = "expert", threshold: float = 0.5,
            labels=None) -> dict[str, np.ndarray]:
    """Routes a batch. Returns `labels` (predicted class), `probs` (softmax of the exit
    taken), `exit` (0 = O1, ..., m-1 = last exit) and `flops` (cost of each sample's path)."""
    _check_rule(rule, threshold)
    x = check_images(images, cascade.model.cfg.image_size)
    out = run_cascade(cascade, x, rule, float(threshold),
                      None if labels is None else np.asarray(labels))
    probs = softmax_np(out["logits"])
    return {"labels": probs.argmax(-1), "probs": probs, "exit": out["exit"], "flops": out["flops"]}


def calibrate(cascade: Cascade, images, labels, rule: str = "expert",
              max_drop: float | None = None, flops_budget: float | None = None) -> dict:
    """Chooses a threshold on a labelled set: the largest FLOPs saving with accuracy at most
    `max_drop` (a fraction, 0.01 = one point) below the last exit alone, or the best accuracy
    within `flops_budget` FLOPs per image. Returns the chosen point (threshold, accuracy,
    flops, exit shares) and the reference accuracy/FLOPs of the last exit alone."""
    _check_rule(rule)
    if rule == "oracle":
        raise ValueError("the oracle is an upper bound and cannot be calibrated for use")
    x = check_images(images, cascade.model.cfg.image_size)
    y = np.asarray(labels)
    if y.shape != (len(x),):
        raise ValueError(f"labels must have shape ({len(x)},); got {y.shape}")
    outputs = all_outputs(cascade, x)
    costs = path_flops(cascade, rule)
    points = sweep_rule(outputs, y, rule, costs)
    ref_acc = float((outputs["exits"][-1].argmax(-1) == y).mean())
    chosen = choose_threshold(points, ref_acc, max_drop, flops_budget)
    if chosen is None:
        raise ValueError("no threshold meets the target on this set")
    return {**chosen, "reference_accuracy": ref_acc, "reference_flops": last_exit_flops(cascade)}
