"""The host-side early-exit controller: real exits in batch mode.

For a batch it runs segment 1 and exit O1, scores every sample with the chosen rule, and
decides on the host which samples leave. Only the samples routed onward are gathered (on the
device) and run through the next segment; answers are scattered back in input order.
Sub-batches are padded to a few fixed bucket sizes so nothing recompiles after warm-up.

Rules (score = how sure we are that the sample may leave; it leaves when score > threshold):
  expert       softmax(E_i)[Other], the proposed expert (concat with O_i's output)
  aux5b        softmax(E_i')[Other], the "Auxiliary+5b" expert
  max_softmax  max softmax(O_i), "Auxiliary as Expert"
  entropy      1 - H(softmax(O_i)) / log(C), BranchyNet's entropy rule, scaled to [0, 1]
  oracle       needs labels: FT samples score in [0, 0.5), the rest in [0.5, 1) (random
               order inside each group), so threshold 0.5 sends exactly the FT samples deep.
               It runs every exit on every sample to know FT: for the upper bound only.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cnneb_jax.data import normalize
from cnneb_jax.heads import OTHER
from cnneb_jax.metrics import ft_labels, segment_flops
from cnneb_jax.model import Model, Variables, segment_fns

RULES = ("expert", "aux5b", "max_softmax", "entropy", "oracle")


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to 32, then steps of max(32, max_batch/8): padding wastes little."""
    sizes = {b for b in (1, 2, 4, 8, 16, 32) if b < max_batch}
    step = max(32, math.ceil(max_batch / 8))
    sizes.update(range(step, max_batch, step))
    sizes.add(max_batch)
    return tuple(sorted(sizes))


@dataclasses.dataclass(frozen=True)
class Cascade:
    """A trained CNN-EB ready to route: variables, per-segment jitted functions, buckets,
    and the FLOPs per image of every part (for the cost of each sample's path)."""
    model: Model
    variables: Variables
    fns: dict[str, Callable]
    buckets: tuple[int, ...]
    flops: dict[str, float]
    # Where it was loaded from (api.calibrate stores the chosen point there) and the point
    # (rule, threshold, ...) that api.predict uses when it is given neither.
    workdir: Path | None = None
    operating_point: dict = dataclasses.field(default_factory=dict)
    class_names: tuple[str, ...] | None = None   # in label order, when the workdir has them

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]


def make_cascade(model: Model, variables: Variables, max_batch: int = 256,
                 workdir: Path | None = None, operating_point: dict | None = None) -> Cascade:
    fns = dict(segment_fns(model))
    # uint8 pixels travel to the device as uint8 (4x fewer bytes than float32) and are cast
    # there; floats in [0, 255] take the same function at their own dtype.
    fns["normalize"] = jax.jit(normalize)
    fns["take"] = jax.jit(lambda h, idx: jnp.take(h, idx, axis=0))
    return Cascade(model, variables, fns, bucket_sizes(max_batch),
                   segment_flops(model, variables), workdir, dict(operating_point or {}))


def bucket_for(c: Cascade, n: int) -> int:
    return next(b for b in c.buckets if b >= n)


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])


def softmax_np(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def rule_score(rule: str, o_logits: np.ndarray, e_logits: np.ndarray | None) -> np.ndarray:
    """Leave-score in [0, 1] for the non-oracle rules (see module docstring)."""
    if rule in ("expert", "aux5b"):
        return softmax_np(e_logits)[:, OTHER]
    p = softmax_np(o_logits)
    if rule == "max_softmax":
        return p.max(-1)
    if rule == "entropy":
        h = -np.sum(p * np.log(np.clip(p, 1e-12, None)), -1)
        return 1.0 - h / np.log(p.shape[-1])
    raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")


def oracle_scores(exit_preds: list[np.ndarray], labels: np.ndarray, i: int,
                  seed: int = 0) -> np.ndarray:
    u = np.random.default_rng([seed, i]).random(len(labels))
    ft = ft_labels(exit_preds, labels, i).astype(bool)
    return np.where(ft, 0.5 * u, 0.5 + 0.5 * u)


def step_flops(c: Cascade, rule: str) -> tuple[list[float], list[float], list[float]]:
    """FLOPs per image of each segment, each exit, and the rule at each branch point (0 at
    the last exit and for rules computed from O_i alone)."""
    segs = [f for k, f in c.flops.items() if k.startswith("seg:")]
    heads = [f for k, f in c.flops.items() if k.startswith("head:")]
    rule_cost = [{"expert": c.flops.get(f"expert:E{i + 1}", 0.0),
                  "aux5b": c.flops.get(f"aux5b:E{i + 1}", 0.0)}.get(rule, 0.0)
                 for i in range(len(segs) - 1)] + [0.0]
    return segs, heads, rule_cost


def path_flops(c: Cascade, rule: str) -> np.ndarray:
    """FLOPs per image for leaving at exit 0..m-1 under `rule` (rule cost at each branch)."""
    segs, heads, rule_cost = step_flops(c, rule)
    m = len(segs)
    # Reaching exit i costs all segments and heads up to i, and the rule at every branch
    # point passed (0..i-1) plus the one at i (evaluated before deciding to leave).
    return np.cumsum([segs[i] + heads[i] + rule_cost[i] for i in range(m)])


def last_exit_flops(c: Cascade) -> float:
    """FLOPs per image of the plain network: every segment and the last exit, no branches."""
    segs = sum(f for k, f in c.flops.items() if k.startswith("seg:"))
    return segs + c.flops[f"head:O{c.model.num_exits}"]


def first_exit_flops(c: Cascade) -> float:
    """FLOPs per image of the first segment and O1 alone."""
    first = next(k for k in c.flops if k.startswith("seg:"))
    return c.flops[first] + c.flops["head:O1"]


def run_cascade(c: Cascade, images: np.ndarray, rule: str, threshold: float,
                labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Routes a batch (uint8, or float in [0, 255], NHWC). Returns per sample: `logits` of
    the exit taken, `exit` (0-based), `flops` of its path. Batches larger than the biggest
    bucket are processed in chunks."""
    if len(images) > c.max_batch:
        parts = [run_cascade(c, images[s:s + c.max_batch], rule, threshold,
                             None if labels is None else labels[s:s + c.max_batch])
                 for s in range(0, len(images), c.max_batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    model, v, fns = c.model, c.variables, c.fns
    m = model.num_exits
    n = len(images)
    seg_names, head_names = list(model.segments), list(model.heads)
    oracle_s = None
    if rule == "oracle":
        oracle_s = _oracle_all(c, images, labels)
    costs = path_flops(c, rule)
    out_logits = np.zeros((n, model.cfg.num_classes), np.float32)
    out_exit = np.full(n, m - 1, np.int32)
    active = np.arange(n)
    size = bucket_for(c, n)
    h = fns["normalize"](pad_rows(pixels(images), size))
    for i in range(m):
        h = fns[f"seg:{seg_names[i]}"](v["segments"][seg_names[i]], h)
        o = fns[f"head:{head_names[i]}"](v["heads"][head_names[i]], h)
        if i == m - 1:
            out_logits[active] = np.asarray(o)[:len(active)]
            out_exit[active] = i
            break
        name = f"E{i + 1}"
        if rule == "expert":
            e = np.asarray(fns[f"expert:{name}"](v["experts"][name], h, o))[:len(active)]
        elif rule == "aux5b":
            e = np.asarray(fns[f"aux5b:{name}"](v["aux5b"][name], h))[:len(active)]
        else:
            e = None
        o_np = np.asarray(o)[:len(active)]
        score = oracle_s[i][active] if rule == "oracle" else rule_score(rule, o_np, e)
        leave = score > threshold
        out_logits[active[leave]] = o_np[leave]
        out_exit[active[leave]] = i
        keep = np.nonzero(~leave)[0]
        if len(keep) == 0:
            break
        active = active[keep]
        size = bucket_for(c, len(keep))
        # Gather the samples that go on, padded to a bucket (pad rows repeat row 0).
        h = fns["take"](h, pad_rows(keep.astype(np.int32), size))
    return {"logits": out_logits, "exit": out_exit, "flops": costs[out_exit]}


def _oracle_all(c: Cascade, images: np.ndarray, labels: np.ndarray | None) -> list[np.ndarray]:
    if labels is None:
        raise ValueError("the oracle rule needs labels (it is an upper bound, not a router)")
    preds = all_exit_predictions(c, images)
    return [oracle_scores(preds, np.asarray(labels), i) for i in range(len(preds) - 1)]


def all_exit_predictions(c: Cascade, images: np.ndarray) -> list[np.ndarray]:
    """Predicted class at every exit for every sample (runs the whole network)."""
    outs = all_outputs(c, images)
    return [o.argmax(-1) for o in outs["exits"]]


def all_outputs(c: Cascade, images: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Logits of every exit and expert for every sample, through the same per-segment
    functions the cascade uses (for sweeps, PR/ROC curves and the oracle)."""
    model, v, fns = c.model, c.variables, c.fns
    seg_names, head_names = list(model.segments), list(model.heads)
    m = model.num_exits
    acc: dict[str, list[list[np.ndarray]]] = {"exits": [[] for _ in range(m)],
                                              "experts": [[] for _ in range(m - 1)],
                                              "aux5b": [[] for _ in range(m - 1)]}
    for s in range(0, len(images), c.max_batch):
        chunk = pixels(images[s:s + c.max_batch])
        k = len(chunk)
        h = fns["normalize"](pad_rows(chunk, bucket_for(c, k)))
        for i in range(m):
            h = fns[f"seg:{seg_names[i]}"](v["segments"][seg_names[i]], h)
            o = fns[f"head:{head_names[i]}"](v["heads"][head_names[i]], h)
            acc["exits"][i].append(np.asarray(o)[:k])
            if i < m - 1:
                name = f"E{i + 1}"
                acc["experts"][i].append(np.asarray(
                    fns[f"expert:{name}"](v["experts"][name], h, o))[:k])
                acc["aux5b"][i].append(np.asarray(fns[f"aux5b:{name}"](v["aux5b"][name], h))[:k])
    return {key: [np.concatenate(parts) for parts in lists] for key, lists in acc.items()}


def pixels(images) -> np.ndarray:
    """uint8 stays uint8 (cast on the device); anything else becomes float32 in [0, 255]."""
    x = np.asarray(images)
    return x if x.dtype == np.uint8 else x.astype(np.float32)


def warm_up(c: Cascade) -> None:
    """Compiles every function at every bucket size for uint8 and float32 pixels, and every
    gather routing can run (from a bucket to the same or a smaller one: the samples that
    go on are never more than those that came in), so that routing never compiles later."""
    cfg = c.model.cfg
    for p in c.buckets:
        x = np.zeros((p, cfg.image_size, cfg.image_size, 3), np.uint8)
        c.fns["normalize"](x.astype(np.float32))
        all_outputs(c, x)  # every segment, head and expert at size p
        h = c.fns["normalize"](x)
        for name in list(c.model.segments)[:-1]:
            h = c.fns[f"seg:{name}"](c.variables["segments"][name], h)
            for q in c.buckets:
                if q <= p:
                    c.fns["take"](h, np.zeros(q, np.int32))
