"""Threshold sweeps, operating points, PR/ROC points.

Routing never changes what a segment computes (tests in test_controller.py show the cascade's
answers equal the per-exit outputs), so accuracy, exit shares and FLOPs of a rule at any
threshold follow exactly from the outputs of every exit on every sample. Wall-clock time
cannot: `evaluate.py` measures it by running the real cascade.
"""

from __future__ import annotations

import numpy as np

from cnneb_jax.controller import oracle_scores, rule_score
from cnneb_jax.metrics import ft_labels, roc_auc

EXPERT_RULES = ("expert", "aux5b", "max_softmax", "entropy")


def branch_scores(outputs: dict, rule: str, labels: np.ndarray | None = None) -> list[np.ndarray]:
    """Leave-score of every sample at every branch point (m-1 arrays)."""
    m = len(outputs["exits"])
    if rule == "oracle":
        if labels is None:
            raise ValueError("the oracle rule needs labels")
        preds = [o.argmax(-1) for o in outputs["exits"]]
        return [oracle_scores(preds, labels, i) for i in range(m - 1)]
    experts = {"expert": outputs.get("experts"), "aux5b": outputs.get("aux5b")}.get(rule)
    return [rule_score(rule, outputs["exits"][i], None if experts is None else experts[i])
            for i in range(m - 1)]


def route(scores: list[np.ndarray], threshold: float) -> np.ndarray:
    """Exit index per sample: the first branch point whose score exceeds the threshold."""
    m = len(scores) + 1
    exits = np.full(len(scores[0]) if scores else 0, m - 1, np.int32)
    undecided = np.ones_like(exits, dtype=bool)
    for i, s in enumerate(scores):
        leave = undecided & (s > threshold)
        exits[leave] = i
        undecided &= ~leave
    return exits


def evaluate_point(outputs: dict, labels: np.ndarray, scores: list[np.ndarray],
                   threshold: float, costs: np.ndarray) -> dict:
    exits = route(scores, threshold)
    preds = np.stack([o.argmax(-1) for o in outputs["exits"]])[exits, np.arange(len(labels))]
    m = len(outputs["exits"])
    return {"threshold": float(threshold), "accuracy": float((preds == labels).mean()),
            "flops": float(costs[exits].mean()),
            **{f"share_exit{i + 1}": float((exits == i).mean()) for i in range(m)}}


def threshold_grid(scores: list[np.ndarray], n: int = 41) -> np.ndarray:
    """Thresholds at quantiles of the first branch's scores (smooth curves whatever the
    score distribution), plus 0 and 1 (everything leaves / nothing leaves)."""
    q = np.quantile(scores[0], np.linspace(0, 1, n)) if len(scores[0]) else np.array([])
    return np.unique(np.clip(np.concatenate([[0.0], q, [1.0]]), 0.0, 1.0))


def sweep_rule(outputs: dict, labels: np.ndarray, rule: str, costs: np.ndarray,
               thresholds: np.ndarray | None = None) -> list[dict]:
    scores = branch_scores(outputs, rule, labels)
    grid = threshold_grid(scores) if thresholds is None else thresholds
    return [{"rule": rule, **evaluate_point(outputs, labels, scores, t, costs)} for t in grid]


def choose_threshold(points: list[dict], reference_acc: float, max_drop: float | None = None,
                     flops_budget: float | None = None) -> dict | None:
    """Largest saving with accuracy >= reference - max_drop, or best accuracy within a
    FLOPs budget (per image). None if no point qualifies."""
    if (max_drop is None) == (flops_budget is None):
        raise ValueError("give exactly one of max_drop and flops_budget")
    if max_drop is not None:
        ok = [p for p in points if p["accuracy"] >= reference_acc - max_drop - 1e-12]
        return min(ok, key=lambda p: (p["flops"], -p["accuracy"])) if ok else None
    ok = [p for p in points if p["flops"] <= flops_budget + 1e-6]
    return max(ok, key=lambda p: (p["accuracy"], -p["flops"])) if ok else None


def pr_roc(outputs: dict, labels: np.ndarray, rule: str, branch: int = 0) -> dict:
    """Precision/recall and ROC of a rule's score as a classifier of Other (positive) vs FT
    at one branch point, over all thresholds."""
    preds = [o.argmax(-1) for o in outputs["exits"]]
    other = ft_labels(preds, labels, branch) == 0
    score = branch_scores(outputs, rule, labels)[branch]
    order = np.argsort(-score, kind="mergesort")
    tp = np.cumsum(other[order])
    fp = np.cumsum(~other[order])
    n_pos, n_neg = max(int(other.sum()), 1), max(int((~other).sum()), 1)
    return {"recall": tp / n_pos, "precision": tp / np.maximum(tp + fp, 1),
            "tpr": np.concatenate([[0.0], tp / n_pos]), "fpr": np.concatenate([[0.0], fp / n_neg]),
            "auc": roc_auc(score, other)}
