"""The routing step, written once: at a branch point, score each sample with the rule,
decide who leaves, and say which rows go on. Used by the live controller (batch mode),
throughput mode (a stream of batches) and the exported cascade's runner (serving.py).

numpy only, and no other cnneb_jax module: serving.py, which keeps to jax and numpy,
imports it as it is.
"""

from __future__ import annotations

import numpy as np

RULES = ("expert", "aux5b", "max_softmax", "entropy", "oracle")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def score(rule: str, o_logits: np.ndarray, e_logits: np.ndarray | None,
          other: int) -> np.ndarray:
    """Leave-score in [0, 1] for the non-oracle rules (controller.py's docstring): the
    expert's probability of Other (class `other` of its two), O_i's max softmax, or one
    minus O_i's normalised entropy."""
    if rule in ("expert", "aux5b"):
        return softmax(e_logits)[:, other]
    p = softmax(o_logits)
    if rule == "max_softmax":
        return p.max(-1)
    if rule == "entropy":
        h = -np.sum(p * np.log(np.clip(p, 1e-12, None)), -1)
        return 1.0 - h / np.log(p.shape[-1])
    raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")


def decide(small: np.ndarray, n: int, num_classes: int, rule: str, threshold: float,
           other: int, scores: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One branch point for `n` samples, from its program's small output [O_i | expert
    logits] (bucket padding past `n` ignored): (O_i's logits, who leaves, the rows that go
    on). A sample leaves when its score is above `threshold`; `scores` replaces the rule's
    (the oracle)."""
    small = np.asarray(small)[:n]
    o, e = small[:, :num_classes], small[:, num_classes:]
    if scores is None:
        scores = score(rule, o, e if e.shape[1] else None, other)
    leave = scores > threshold
    return o, leave, np.nonzero(~leave)[0]


def bucket_for(buckets, n: int) -> int:
    """The smallest bucket size that holds `n` rows."""
    return next(b for b in buckets if b >= n)


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """`x` padded with zero rows to `size` rows (the fixed shapes programs compile for)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])
