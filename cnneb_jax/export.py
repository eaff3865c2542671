"""Exports a trained cascade for serving: every segment, exit and expert as serialized
StableHLO (`jax.export`), with the trained parameters baked in, plus `manifest.json`.

The batch dimension is symbolic, so one file serves every bucket size. The loader in
`cnneb_jax/serving.py` runs the cascade from these files alone (jax and numpy, no Flax,
no model code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp

from cnneb_jax.controller import path_flops
from cnneb_jax.programs import Cascade
from cnneb_jax.augment import normalize
from cnneb_jax.heads import OTHER
from cnneb_jax.model import build_model, segment_fns

# 2: every part lowered for several platforms (`platforms` in the manifest) and its sha256.
FORMAT_VERSION = 2
# CPU and CUDA by default: an export made on a CPU machine also runs on an NVIDIA GPU.
DEFAULT_PLATFORMS = ("cpu", "cuda")


# One symbolic batch size shared by every input of every part (one symbolic scope).
_BATCH, = jax.export.symbolic_shape("b")


def _spec(shape_tail: tuple[int, ...], dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((_BATCH, *shape_tail), dtype)


def export_cascade(cascade: Cascade, out_dir: str | Path, rule: str,
                   threshold: float, calibration: dict | None = None,
                   platforms: Sequence[str] = DEFAULT_PLATFORMS) -> Path:
    """Writes `<part>.stablehlo` for each part and `manifest.json` into `out_dir`.

    `rule` and `threshold` are the operating point the server uses by default (for
    example from `api.calibrate`); `calibration` (that call's result) is kept for the record.
    Every part is lowered for each of `platforms` (JAX names: cpu, cuda, rocm, tpu), so it
    runs on any of them, whatever machine exports it.
    """
    platforms = tuple(platforms)
    if not platforms or not set(platforms) <= {"cpu", "cuda", "rocm", "tpu"}:
        raise ValueError(f"platforms must be some of cpu, cuda, rocm, tpu; got {platforms}")
    model, v = cascade.model, cascade.variables
    cfg = model.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # XLA's own kernels: an export runs wherever jax does (oneDNN's are a library on this
    # machine, and a CPU-only one); the variables are the same either way.
    fns = segment_fns(build_model(dataclasses.replace(cfg, onednn="off")))
    parts: list[dict] = []

    def write(name: str, fn, *specs):
        exp = jax.export.export(jax.jit(fn), platforms=platforms)(*specs)
        blob = exp.serialize()
        (out / f"{name}.stablehlo").write_bytes(blob)
        parts.append({"name": name, "file": f"{name}.stablehlo",
                      "inputs": [list(s.shape[1:]) for s in specs],
                      "sha256": hashlib.sha256(blob).hexdigest()})
        return jax.eval_shape(fn, *[jax.ShapeDtypeStruct((2, *s.shape[1:]), s.dtype)
                                    for s in specs])

    h_spec = _spec((cfg.image_size, cfg.image_size, 3))
    seg_names, head_names = list(model.segments), list(model.heads)
    for i, seg in enumerate(seg_names):
        sv = v["segments"][seg]
        if i == 0:  # the first segment takes raw pixels in [0, 255]
            f = lambda x, sv=sv, g=fns[f"seg:{seg}"]: g(sv, normalize(x, cfg.input_norm))
        else:
            f = lambda h, sv=sv, g=fns[f"seg:{seg}"]: g(sv, h)
        feat = write(f"seg{i}", f, h_spec)
        f_spec = _spec(feat.shape[1:], feat.dtype)
        hv = v["heads"][head_names[i]]
        write(f"head{i}", lambda h, hv=hv, g=fns[f"head:{head_names[i]}"]: g(hv, h), f_spec)
        if i < len(seg_names) - 1:
            name = f"E{i + 1}"
            ev, av = v["experts"][name], v["aux5b"][name]
            o_spec = _spec((cfg.num_classes,))
            write(f"expert{i}", lambda h, o, ev=ev, g=fns[f"expert:{name}"]: g(ev, h, o),
                  f_spec, o_spec)
            write(f"aux5b{i}", lambda h, av=av, g=fns[f"aux5b:{name}"]: g(av, h), f_spec)
        h_spec = f_spec

    manifest = _manifest(cascade, platforms, rule, threshold, calibration, parts)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=float))
    return out


def _manifest(cascade: Cascade, platforms: tuple, rule: str, threshold: float,
              calibration: dict | None, parts: list[dict]) -> dict:
    """What serving.py needs besides the parts: shapes, buckets, the operating point and
    the FLOPs of every path."""
    model = cascade.model
    cfg = model.cfg
    return {
        "format_version": FORMAT_VERSION,
        "platforms": list(platforms),
        "config": cfg.name,
        "branch_points": list(cfg.branch_points),
        "num_exits": model.num_exits,
        "input_shape": [cfg.image_size, cfg.image_size, 3],
        "input_range": "uint8 or float pixels in [0, 255], NHWC",
        "num_classes": cfg.num_classes,
        "expert_other_index": OTHER,
        "bucket_sizes": list(cascade.buckets),
        "rule": rule,
        "threshold": float(threshold),
        "path_flops": {r: path_flops(cascade, r).tolist()
                       for r in ("expert", "aux5b", "max_softmax", "entropy")},
        "calibration": calibration,
        "parts": parts,
    }
