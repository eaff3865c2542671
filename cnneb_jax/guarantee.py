"""Thresholds chosen with a statistical guarantee on the accuracy drop (Learn-then-Test).

On a set of images, a threshold t routes each image to an exit; its drop against the last
exit alone is

    drop(t) = loss(t) - gain(t)

with loss the share of images the last exit gets right and the exit taken gets wrong, gain
the reverse. Both are binomial proportions, so (Clopper-Pearson, alpha/2 each)

    UCB(t) = upper(losses, n, alpha/2) - lower(gains, n, alpha/2)

bounds the drop on the population the calibration images were drawn from with probability
at least 1 - alpha. Candidates are every distinct score (each moves at least one image),
from the most conservative (t = 1: nothing leaves, drop exactly 0) down to the cheapest.
Fixed-sequence testing (Learn-then-Test, Angelopoulos et al. 2021; CALM, Schuster et al.
2022, for early exit) walks down them while UCB(t) <= max_drop and returns the last one that
passed: P(population drop at the returned threshold > max_drop) <= alpha, over the draw of
the calibration set. `choose_threshold` (sweep.py) meets the drop on the calibration images
only, with no margin.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import beta

from cnneb_jax.sweep import branch_scores, evaluate_point, route


def binomial_upper(k: np.ndarray, n: int, a: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound (level 1-a) of a proportion, k of n."""
    k = np.asarray(k, float)
    return np.where(k >= n, 1.0, beta.ppf(1 - a, k + 1, np.maximum(n - k, 1e-12)))


def binomial_lower(k: np.ndarray, n: int, a: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound (level 1-a) of a proportion, k of n."""
    k = np.asarray(k, float)
    return np.where(k <= 0, 0.0, beta.ppf(a, np.maximum(k, 1e-12), n - k + 1))


def candidate_thresholds(scores: list[np.ndarray]) -> np.ndarray:
    """1.0, then every distinct score below it, in decreasing order (cheaper and cheaper)."""
    values = np.unique(np.concatenate([s.ravel() for s in scores] + [np.array([1.0])]))
    return values[::-1][values[::-1] <= 1.0]


def loss_gain_counts(preds: np.ndarray, labels: np.ndarray, scores: list[np.ndarray],
                     thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(losses, gains) at each threshold; preds is (m, n), the prediction of every exit."""
    last_right = preds[-1] == labels
    right = preds == labels
    if len(scores) == 1:  # one branch point: sort once, count by prefix sums
        s = scores[0]
        order = np.argsort(-s, kind="stable")
        l_sorted = np.concatenate([[0], np.cumsum((last_right & ~right[0])[order])])
        g_sorted = np.concatenate([[0], np.cumsum((right[0] & ~last_right)[order])])
        leaving = np.searchsorted(-s[order], -thresholds, side="left")  # count of s > t
        return l_sorted[leaving], g_sorted[leaving]
    losses, gains = [], []
    n = len(labels)
    for t in thresholds:
        exit_right = right[route(scores, t), np.arange(n)]
        losses.append(int((last_right & ~exit_right).sum()))
        gains.append(int((exit_right & ~last_right).sum()))
    return np.array(losses), np.array(gains)


def choose_threshold_guaranteed(outputs: dict, labels: np.ndarray, rule: str,
                                costs: np.ndarray, max_drop: float,
                                alpha: float = 0.1) -> dict:
    """The cheapest threshold that Learn-then-Test certifies (see the module docstring):
    the returned point has, besides the usual fields, `drop_ucb` and `alpha`."""
    if not 0.0 <= max_drop < 1.0 or not 0.0 < alpha < 1.0:
        raise ValueError(f"max_drop must be in [0, 1) and alpha in (0, 1); got {max_drop}, "
                         f"{alpha}")
    scores = branch_scores(outputs, rule, labels)
    preds = np.stack([o.argmax(-1) for o in outputs["exits"]])
    t, ucb, passed, candidates = certified_threshold(preds, labels, scores, max_drop, alpha)
    point = evaluate_point(outputs, labels, scores, t, costs)
    return {"rule": rule, **point, "drop_ucb": ucb, "alpha": alpha,
            "candidates_passed": passed, "candidates": candidates}


def certified_threshold(preds: np.ndarray, labels: np.ndarray, scores: list[np.ndarray],
                        max_drop: float, alpha: float) -> tuple[float, float, int, int]:
    """The fixed-sequence walk of the module docstring from counts alone (preds is (m, n),
    every exit's prediction): (threshold, its drop bound, candidates passed, candidates).
    Cheap enough to run once per bootstrap resample."""
    n = len(labels)
    thresholds = candidate_thresholds(scores)
    losses, gains = loss_gain_counts(preds, labels, scores, thresholds)
    ucb = binomial_upper(losses, n, alpha / 2) - binomial_lower(gains, n, alpha / 2)
    ucb[0] = 0.0  # t = 1: nothing leaves, the drop is exactly zero
    failed = np.nonzero(ucb > max_drop)[0]
    last = (failed[0] - 1) if len(failed) else len(thresholds) - 1
    return float(thresholds[last]), float(ucb[last]), int(last + 1), int(len(thresholds))


def realized_drop(outputs: dict, labels: np.ndarray, rule: str, threshold: float) -> float:
    """Accuracy of the last exit alone minus the cascade's at `threshold`, on these images."""
    scores = branch_scores(outputs, rule, labels)
    preds = np.stack([o.argmax(-1) for o in outputs["exits"]])
    exits = route(scores, threshold)
    taken = preds[exits, np.arange(len(labels))]
    return float((preds[-1] == labels).mean() - (taken == labels).mean())


def exceedance_rates(cal: tuple[dict, np.ndarray], test: tuple[dict, np.ndarray], rule: str,
                     costs: np.ndarray, max_drop: float, alpha: float = 0.1,
                     resamples: int = 200, seed: int = 0) -> dict:
    """How often the drop realized on the test images exceeds `max_drop` when the threshold
    is chosen on a bootstrap resample of the calibration images (a fresh calibration draw),
    with the guarantee and with `sweep.choose_threshold` (the naive rule on its usual grid of
    41 score quantiles, as `api.calibrate` without alpha). Also the mean FLOPs each spends."""
    from cnneb_jax.sweep import choose_threshold, sweep_rule
    out_c, y_c = cal
    out_t, y_t = test
    rng = np.random.default_rng(seed)
    ref = lambda o, y: float((o["exits"][-1].argmax(-1) == y).mean())
    # The test side is fixed: score it once; a point's drop is the reference minus its accuracy.
    scores_t, ref_t = branch_scores(out_t, rule, y_t), ref(out_t, y_t)
    res = {"guaranteed": [], "naive": []}
    for _ in range(resamples):
        idx = rng.integers(0, len(y_c), len(y_c))
        o = {k: [a[idx] for a in v] for k, v in out_c.items()}
        g = choose_threshold_guaranteed(o, y_c[idx], rule, costs, max_drop, alpha)
        naive = choose_threshold(sweep_rule(o, y_c[idx], rule, costs), ref(o, y_c[idx]),
                                 max_drop=max_drop)
        for name, p in (("guaranteed", g), ("naive", naive)):
            test_point = evaluate_point(out_t, y_t, scores_t, p["threshold"], costs)
            res[name].append((ref_t - test_point["accuracy"] > max_drop, test_point["flops"]))
    return {name: {"exceed_rate": float(np.mean([e for e, _ in v])),
                   "mean_flops": float(np.mean([f for _, f in v]))} for name, v in res.items()}


def bootstrap_means(values: dict[str, np.ndarray], resamples: int, seed: int,
                    groups: dict[str, str] | None = None) -> dict:
    """Means of every array over the same bootstrap resamples of the images. A 2-D array
    holds one row per expert seed: each resample also draws one of its rows. Arrays of one
    group (`groups` maps a key to its group, for example a rule's accuracy and its saving to
    the rule) draw the same row in each resample, so they come from one seed; by default
    each array is a group of its own."""
    n = next(iter(values.values())).shape[-1]
    groups = {k: (groups or {}).get(k, k) for k in values}
    seeds: dict[str, int] = {}
    for k, v in values.items():
        if v.ndim == 2 and seeds.setdefault(groups[k], len(v)) != len(v):
            raise ValueError(f"the arrays of group {groups[k]!r} hold different numbers of "
                             f"seeds ({seeds[groups[k]]} and {len(v)}, at {k!r})")
    rng = np.random.default_rng(seed)
    out = {k: np.empty(resamples) for k in values}
    for s in range(0, resamples, 100):
        idx = rng.integers(0, n, (min(100, resamples - s), n))
        rows: dict[str, np.ndarray] = {}
        for k, v in values.items():
            if v.ndim == 2:
                g = groups[k]
                if g not in rows:
                    rows[g] = rng.integers(0, len(v), len(idx))
                out[k][s:s + len(idx)] = v[rows[g][:, None], idx].mean(1)
            else:
                out[k][s:s + len(idx)] = v[idx].mean(1)
    return out


def within_target_share(last_right: np.ndarray, cascade_right: np.ndarray, max_drop: float,
                        resamples: int = 1000, seed: int = 0) -> float:
    """Share of bootstrap resamples of these (test) images on which the cascade's realized
    drop against the last exit alone stays within `max_drop`: how often a fresh test set
    of this size would see the target kept."""
    diff = np.asarray(last_right, float) - np.asarray(cascade_right, float)
    drops = bootstrap_means({"drop": diff}, resamples, seed)["drop"]
    return float((drops <= max_drop + 1e-12).mean())
