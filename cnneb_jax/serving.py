"""Runs an exported cascade (see `cnneb_jax/export.py`) with jax and numpy only: no Flax,
no model or training code is imported, so this file can be copied next to the exported
folder and used on its own.

    from cnneb_jax import serving
    cascade = serving.load("runs/cifar/export")
    out = serving.predict(cascade, images)      # manifest's rule and threshold
    out["labels"], out["probs"], out["exit"], out["flops"]
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
import numpy as np

SUPPORTED_FORMAT = 1
RULES = ("expert", "aux5b", "max_softmax", "entropy")


@dataclasses.dataclass(frozen=True)
class ExportedCascade:
    manifest: dict
    fns: dict[str, Callable]

    @property
    def buckets(self) -> list[int]:
        return self.manifest["bucket_sizes"]


def load(export_dir: str | Path) -> ExportedCascade:
    d = Path(export_dir)
    path = d / "manifest.json"
    if not path.exists():
        raise ValueError(f"{d} has no manifest.json: not an exported cascade")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != SUPPORTED_FORMAT:
        raise ValueError(f"{d}: export format {manifest.get('format_version')} is not "
                         f"supported (this loader reads format {SUPPORTED_FORMAT})")
    fns = {}
    for part in manifest["parts"]:
        exp = jax.export.deserialize(bytearray((d / part["file"]).read_bytes()))
        fns[part["name"]] = jax.jit(exp.call)  # compiles once per bucket size
    return ExportedCascade(manifest, fns)


def check_images(images, input_shape) -> np.ndarray:
    """The one input convention of the API and the server: uint8 in [0, 255] or float in
    [0, 1], shaped (N, H, W, C) or one (H, W, C) image. Returns float32 in [0, 255] with a
    batch axis (what the first segment takes); raises ValueError on anything else."""
    h, w, ch = input_shape
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W, {ch}) or (H, W, {ch}); got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("empty batch: images has no samples")
    if x.shape[1:] != (h, w, ch):
        hint = (" (channels first? images are channels last: N, H, W, C)"
                if x.shape[1] == ch and x.shape[3] != ch else "")
        raise ValueError(f"images must be {h}x{w} with {ch} channels; "
                         f"got {x.shape[1]}x{x.shape[2]} with {x.shape[3]} channels{hint}")
    if x.dtype == np.uint8:
        return x.astype(np.float32)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float; got {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or inf")
    if x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(f"float images must lie in [0, 1]; got [{x.min():.3g}, {x.max():.3g}]"
                         " (uint8 images are read as [0, 255])")
    return x.astype(np.float32) * 255.0


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _score(rule: str, o: np.ndarray, e: np.ndarray | None, other: int) -> np.ndarray:
    if rule in ("expert", "aux5b"):
        return _softmax(e)[:, other]
    p = _softmax(o)
    if rule == "max_softmax":
        return p.max(-1)
    h = -np.sum(p * np.log(np.clip(p, 1e-12, None)), -1)
    return 1.0 - h / np.log(p.shape[-1])


def _pad(x: np.ndarray, buckets: list[int]) -> np.ndarray:
    size = next((b for b in buckets if b >= len(x)), len(x))
    if size == len(x):
        return x
    return np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])


def predict(c: ExportedCascade, images, rule: str | None = None,
            threshold: float | None = None) -> dict[str, np.ndarray]:
    """Routes a batch (NHWC: uint8 in [0, 255] or float in [0, 1], as `api.predict`) through
    the exported parts exactly as the live controller does: a sample leaves at the first
    branch point whose score exceeds the threshold. Defaults: the manifest's calibrated
    rule and threshold."""
    m = c.manifest
    rule = m["rule"] if rule is None else rule
    threshold = m["threshold"] if threshold is None else float(threshold)
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1]; got {threshold}")
    x = check_images(images, m["input_shape"])
    top = c.buckets[-1]
    parts = [_route(c, x[s:s + top], rule, threshold) for s in range(0, len(x), top)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _route(c: ExportedCascade, x: np.ndarray, rule: str, threshold: float) -> dict:
    """One chunk of at most the largest bucket, float32 pixels in [0, 255]."""
    m = c.manifest
    n, last = len(x), m["num_exits"] - 1
    logits = np.zeros((n, m["num_classes"]), np.float32)
    exits = np.full(n, last, np.int32)
    active = np.arange(n)
    h = _pad(x, c.buckets)
    for i in range(m["num_exits"]):
        h = c.fns[f"seg{i}"](h)
        o = c.fns[f"head{i}"](h)
        o_np = np.asarray(o)[:len(active)]
        if i == last:
            logits[active] = o_np
            break
        e = None
        if rule == "expert":
            e = np.asarray(c.fns[f"expert{i}"](h, o))[:len(active)]
        elif rule == "aux5b":
            e = np.asarray(c.fns[f"aux5b{i}"](h))[:len(active)]
        leave = _score(rule, o_np, e, m["expert_other_index"]) > threshold
        logits[active[leave]] = o_np[leave]
        exits[active[leave]] = i
        keep = np.nonzero(~leave)[0]
        if len(keep) == 0:
            break
        active = active[keep]
        h = _pad(np.asarray(h)[keep], c.buckets)
    probs = _softmax(logits)
    flops = np.asarray(m["path_flops"][rule])[exits]
    return {"labels": probs.argmax(-1), "probs": probs, "exit": exits, "flops": flops}
