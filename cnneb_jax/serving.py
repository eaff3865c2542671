"""Runs an exported cascade (see `cnneb_jax/export.py`) with jax and numpy only: no Flax,
no model or training code is imported. It shares the routing step with the live
controller through `routing.py` (numpy only), and imports nothing else of cnneb_jax.

    from cnneb_jax import serving
    cascade = serving.load("runs/cifar/export")
    out = serving.predict(cascade, images)      # manifest's rule and threshold
    out["labels"], out["probs"], out["exit"], out["flops"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
from pathlib import Path
from typing import Callable

import jax
import numpy as np

# numpy only: the one cnneb_jax module serving needs.
from cnneb_jax.routing import bucket_for, decide, pad_rows, softmax

SUPPORTED_FORMATS = (1, 2)  # 1: CPU only, no checksums
RULES = ("expert", "aux5b", "max_softmax", "entropy")


@dataclasses.dataclass(frozen=True)
class ExportedCascade:
    manifest: dict
    fns: dict[tuple | str, Callable]   # ("branch", i, rule) programs and "take"

    @property
    def buckets(self) -> list[int]:
        return self.manifest["bucket_sizes"]


class ExportError(ValueError):
    """An export folder that cannot be served: missing or damaged part, edited manifest,
    another platform. The message names the problem."""


def _need(ok: bool, where: Path, what: str) -> None:
    if not ok:
        raise ExportError(f"{where}: {what}")


def _is_int(x, low: int) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= low


def _check_manifest(m, path: Path) -> None:
    """Every field the loader and `predict` read, with its type and range."""
    _need(isinstance(m, dict), path, "must hold a JSON object")
    _need(m.get("format_version") in SUPPORTED_FORMATS, path,
          f"export format {m.get('format_version')!r} is not supported (this loader reads "
          f"formats {SUPPORTED_FORMATS})")
    for key in ("num_exits", "input_shape", "num_classes", "expert_other_index",
                "bucket_sizes", "rule", "threshold", "path_flops", "parts"):
        _need(key in m, path, f"field {key!r} is missing")
    k = m["num_exits"]
    _need(_is_int(k, 1), path, f"num_exits must be an integer >= 1, got {k!r}")
    shape = m["input_shape"]
    _need(isinstance(shape, list) and len(shape) == 3 and all(_is_int(v, 1) for v in shape),
          path, f"input_shape must be [H, W, C], got {shape!r}")
    _need(_is_int(m["num_classes"], 2), path, f"num_classes must be >= 2, got {m['num_classes']!r}")
    _need(m["expert_other_index"] in (0, 1), path, "expert_other_index must be 0 or 1")
    b = m["bucket_sizes"]
    _need(isinstance(b, list) and b and all(_is_int(v, 1) for v in b) and b == sorted(set(b)),
          path, f"bucket_sizes must be increasing positive integers, got {b!r}")
    _need(m["rule"] in RULES, path, f"rule must be one of {RULES}, got {m['rule']!r}")
    t = m["threshold"]
    _need(is_threshold(t), path, f"threshold must be a number in [0, 1], got {t!r}")
    pf = m["path_flops"]
    _need(isinstance(pf, dict) and all(isinstance(pf.get(r), list) and len(pf[r]) == k
                                       for r in RULES), path,
          f"path_flops must give {k} costs for each of {RULES}")
    _need(isinstance(m["parts"], list) and all(isinstance(p, dict) and "name" in p and "file" in p
                                               for p in m["parts"]), path,
          "parts must be a list of {name, file}")
    names = {p["name"] for p in m["parts"]}
    want = {f"seg{i}" for i in range(k)} | {f"head{i}" for i in range(k)} | \
        {f"expert{i}" for i in range(k - 1)} | {f"aux5b{i}" for i in range(k - 1)}
    _need(want <= names, path, f"parts {sorted(want - names)} are missing from the manifest")


def is_threshold(t) -> bool:
    """A real number (not a bool) in [0, 1]: what every threshold must be."""
    return isinstance(t, numbers.Real) and not isinstance(t, bool) and 0.0 <= t <= 1.0


def _platform() -> str:
    backend = jax.default_backend()
    return "cuda" if backend == "gpu" else backend


def load(export_dir: str | Path) -> ExportedCascade:
    """Reads and checks an export folder; raises ExportError (a ValueError) naming what is
    missing, damaged or inconsistent, or when this machine's platform was not exported."""
    d = Path(export_dir)
    path = d / "manifest.json"
    if not path.exists():
        raise ExportError(f"{d} has no manifest.json: not an exported cascade")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path} is not valid JSON ({e})") from None
    _check_manifest(manifest, path)
    platforms = manifest.get("platforms", ["cpu"])
    _need(_platform() in platforms, d,
          f"exported for {', '.join(platforms)}; this machine runs {_platform()}: export again "
          f"with platforms including {_platform()!r}")
    exps = {}
    for part in manifest["parts"]:
        f = d / part["file"]
        _need(f.is_file(), d, f"part {part['name']} ({part['file']}) is missing")
        blob = f.read_bytes()
        if "sha256" in part:
            _need(hashlib.sha256(blob).hexdigest() == part["sha256"], d,
                  f"part {part['name']} ({part['file']}) is damaged or was changed: its "
                  "sha256 differs from the manifest's")
        try:
            exp = jax.export.deserialize(bytearray(blob))
        except Exception as e:  # flatbuffer/MLIR errors have no common type
            raise ExportError(f"{d}: part {part['name']} ({part['file']}) cannot be read "
                              f"({type(e).__name__}: {e})") from None
        exps[part["name"]] = exp
    first = tuple(exps["seg0"].in_avals[0].shape[1:])
    _need(first == tuple(manifest["input_shape"]), d,
          f"manifest input_shape {manifest['input_shape']} disagrees with seg0's input {first}")
    for i in range(manifest["num_exits"]):
        out = exps[f"head{i}"].out_avals[0].shape[-1]
        _need(out == manifest["num_classes"], d,
              f"manifest num_classes {manifest['num_classes']} disagrees with head{i}'s "
              f"{out} outputs")
    k = manifest["num_exits"]
    fns = {}
    for i in range(k):
        last = i == k - 1
        # max_softmax and entropy share it, and every rule after the last segment (no expert)
        plain = _branch_program(exps, i, last, "plain")
        for rule in RULES:   # each program compiles once per bucket size
            fns[("branch", i, rule)] = (_branch_program(exps, i, last, rule)
                                        if rule in ("expert", "aux5b") and not last else plain)
    fns["take"] = jax.jit(_take)
    return ExportedCascade(manifest, fns)


def check_images(images, input_shape, keep_uint8: bool = False) -> np.ndarray:
    """The one input convention of the API and the server: uint8 in [0, 255] or float in
    [0, 1], shaped (N, H, W, C) or one (H, W, C) image. Returns float32 in [0, 255] with a
    batch axis (what the first segment takes), or the uint8 array itself with `keep_uint8`;
    raises ValueError on anything else."""
    h, w, ch = input_shape
    x = np.asarray(images)
    if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] != ch):
        raise ValueError(f"images of shape {x.shape} have no channel axis: grayscale? give "
                         f"(N, H, W, {ch}) or (H, W, {ch}) arrays, e.g. "
                         f"np.repeat(x[..., None], {ch}, -1)")
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
        return x if keep_uint8 else x.astype(np.float32)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float; got {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or inf")
    if x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(f"float images must lie in [0, 1]; got [{x.min():.3g}, {x.max():.3g}]"
                         " (uint8 images are read as [0, 255])")
    return x.astype(np.float32) * 255.0


def _pad(x: np.ndarray, buckets: list[int]) -> np.ndarray:
    return pad_rows(x, bucket_for(buckets, len(x)))


def _branch_program(exps: dict, i: int, last: bool, rule: str) -> Callable:
    """Segment i, its exit and the rule's expert as one jitted program (the exported parts
    called inside it). Pixels arrive as they are (uint8 stays uint8: 4x fewer bytes to the
    device) and are cast there. Returns the exit's logits after the last segment, else the
    features and [o | expert logits]."""
    def run(x):
        if i == 0:
            x = x.astype(np.float32)
        h = exps[f"seg{i}"].call(x)
        o = exps[f"head{i}"].call(h)
        if last:
            return o
        if rule == "expert":
            return h, jax.numpy.concatenate([o, exps[f"expert{i}"].call(h, o)], -1)
        if rule == "aux5b":
            return h, jax.numpy.concatenate([o, exps[f"aux5b{i}"].call(h)], -1)
        return h, o
    return jax.jit(run)


def _take(h, idx):
    return jax.numpy.take(h, idx, axis=0)


def predict(c: ExportedCascade, images, rule: str | None = None,
            threshold: float | None = None) -> dict[str, np.ndarray]:
    """Routes a batch (NHWC: uint8 in [0, 255] or float in [0, 1], as `api.predict`) through
    the exported parts exactly as the live controller does: a sample leaves at the first
    branch point whose score exceeds the threshold. Defaults: the manifest's calibrated
    rule and threshold. Features stay on the device; the host reads one small array per
    branch point, and the next chunk of a large batch is dispatched before the host routes
    the current one."""
    if not isinstance(c, ExportedCascade):
        raise TypeError(f"predict takes what serving.load returns; got {type(c).__name__}")
    m = c.manifest
    rule = m["rule"] if rule is None else rule
    threshold = m["threshold"] if threshold is None else threshold
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
    if not is_threshold(threshold):
        raise ValueError(f"threshold must be a number in [0, 1]; got {threshold!r}")
    threshold = float(threshold)
    x = check_images(images, m["input_shape"], keep_uint8=True)
    top = c.buckets[-1]
    starts = list(range(0, len(x), top))
    first = lambda s: c.fns[("branch", 0, rule)](_pad(x[s:s + top], c.buckets))
    parts, ahead = [], first(0)
    for k, s in enumerate(starts):
        current = ahead
        if k + 1 < len(starts):
            ahead = first(starts[k + 1])
        parts.append(_route(c, current, len(x[s:s + top]), rule, threshold))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _route(c: ExportedCascade, out, n: int, rule: str, threshold: float) -> dict:
    """One chunk of at most the largest bucket whose first program is already dispatched."""
    m = c.manifest
    last, k = m["num_exits"] - 1, m["num_classes"]
    logits = np.zeros((n, k), np.float32)
    exits = np.full(n, last, np.int32)
    active = np.arange(n)
    for i in range(m["num_exits"]):
        if i == last:
            logits[active] = np.asarray(out)[:len(active)]
            break
        h, small = out
        o_np, leave, keep = decide(small, len(active), k, rule, threshold,
                                   m["expert_other_index"])
        logits[active[leave]] = o_np[leave]
        exits[active[leave]] = i
        if len(keep) == 0:
            break
        if len(keep) < len(active):
            h = c.fns["take"](h, _pad(keep.astype(np.int32), c.buckets))
        active = active[keep]
        out = c.fns[("branch", i + 1, rule)](h)
    probs = softmax(logits)
    flops = np.asarray(m["path_flops"][rule])[exits]
    return {"labels": probs.argmax(-1), "probs": probs, "exit": exits, "flops": flops}
