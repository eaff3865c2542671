"""Thresholds with a statistical guarantee: exact counts, and the promised exceedance rate
on a synthetic population where the true drop of every threshold is known."""

import numpy as np
import pytest

from cnneb_jax.guarantee import (binomial_lower, binomial_upper, candidate_thresholds,
                                 choose_threshold_guaranteed, loss_gain_counts, realized_drop)
from cnneb_jax.sweep import choose_threshold, sweep_rule

COSTS = np.array([1.0, 3.0])


def _population(n, seed=0):
    """One branch point; the expert's leave-score s, O1 right with probability 0.4 + 0.6 s,
    O2 right with probability 0.9. Outputs shaped like controller.all_outputs'."""
    rng = np.random.default_rng(seed)
    s = np.round(rng.random(n), 3)  # rounded: many ties, as real scores have
    y = rng.integers(0, 10, n)
    o1_right = rng.random(n) < 0.4 + 0.6 * s
    o2_right = rng.random(n) < 0.9
    pred = lambda right: np.where(right, y, (y + 1) % 10)
    logits = lambda p: np.eye(10)[p] * 5.0
    e = np.stack([np.zeros(n), np.log(np.clip(s, 1e-6, 1 - 1e-6) / np.clip(1 - s, 1e-6, 1))], 1)
    return {"exits": [logits(pred(o1_right)), logits(pred(o2_right))], "experts": [e]}, y


def _take(out, idx):
    return {k: [a[idx] for a in v] for k, v in out.items()}


def test_prefix_counts_equal_routing_every_threshold():
    out, y = _population(500)
    preds = np.stack([o.argmax(-1) for o in out["exits"]])
    from cnneb_jax.sweep import branch_scores
    scores = branch_scores(out, "expert", y)
    t = candidate_thresholds(scores)
    assert t[0] == 1.0 and np.all(np.diff(t) < 0)
    fast = loss_gain_counts(preds, y, scores, t)
    # Two branch points with the same score and O1's predictions at both: the first decides,
    # so the generic path (routing at every threshold) must give the same counts.
    slow = loss_gain_counts(np.stack([preds[0], preds[0], preds[1]]), y, scores * 2, t)
    np.testing.assert_array_equal(fast[0], slow[0])
    np.testing.assert_array_equal(fast[1], slow[1])
    for i in (0, 7, len(t) // 2, len(t) - 1):
        drop = realized_drop(out, y, "expert", t[i])
        assert drop == pytest.approx((fast[0][i] - fast[1][i]) / len(y))


def test_clopper_pearson_bounds():
    assert binomial_upper(0, 100, 0.05) == pytest.approx(1 - 0.05 ** (1 / 100))
    assert binomial_lower(0, 100, 0.05) == 0.0
    assert binomial_lower(30, 100, 0.05) < 0.30 < binomial_upper(30, 100, 0.05)


def test_guarantee_holds_over_calibration_draws_where_the_naive_choice_does_not():
    pop, y_pop = _population(100_000, seed=1)
    rng = np.random.default_rng(2)
    max_drop, alpha = 0.02, 0.1
    exceed = {"guaranteed": 0, "naive": 0}
    draws = 60
    for _ in range(draws):
        idx = rng.choice(len(y_pop), 1000, replace=False)
        out, y = _take(pop, idx), y_pop[idx]
        g = choose_threshold_guaranteed(out, y, "expert", COSTS, max_drop, alpha)
        assert g["drop_ucb"] <= max_drop and g["alpha"] == alpha
        ref = float((out["exits"][-1].argmax(-1) == y).mean())
        naive = choose_threshold(sweep_rule(out, y, "expert", COSTS), ref, max_drop=max_drop)
        for name, p in (("guaranteed", g), ("naive", naive)):
            exceed[name] += realized_drop(pop, y_pop, "expert", p["threshold"]) > max_drop
    assert exceed["guaranteed"] / draws <= alpha + 0.05
    assert exceed["naive"] / draws >= 0.3


def test_nothing_certified_returns_the_safe_threshold():
    out, y = _population(50)
    p = choose_threshold_guaranteed(out, y, "expert", COSTS, max_drop=0.0, alpha=0.05)
    assert p["threshold"] == 1.0 and p["share_exit1"] == 0.0 and p["drop_ucb"] == 0.0
    with pytest.raises(ValueError, match="max_drop must be in"):
        choose_threshold_guaranteed(out, y, "expert", COSTS, max_drop=1.5)


def test_within_target_share_of_test_resamples():
    from cnneb_jax.guarantee import within_target_share
    n = 10_000
    last = np.ones(n, bool)
    same = last.copy()
    assert within_target_share(last, same, 0.0, resamples=200) == 1.0
    # The cascade loses exactly 1% of the images: a 1-point target is kept in about half
    # the resamples, a 2-point one in all, a half-point one in none.
    lost = last.copy()
    lost[:100] = False
    assert 0.35 < within_target_share(last, lost, 0.01, resamples=400, seed=1) < 0.65
    assert within_target_share(last, lost, 0.02, resamples=200) == 1.0
    assert within_target_share(last, lost, 0.005, resamples=200) == 0.0
    # Gains offset losses.
    gained = lost.copy()
    last2 = last.copy()
    last2[100:200] = False
    assert within_target_share(last2, gained, 0.0, resamples=200) > 0.35


def test_bootstrap_means_pairs_resamples_and_draws_seed_rows():
    from cnneb_jax.guarantee import bootstrap_means
    rng = np.random.default_rng(0)
    a = rng.random(500)
    out = bootstrap_means({"a": a, "same": a.copy(), "const": np.full((3, 500), 2.0)}, 250, 1)
    assert out["a"].shape == (250,)
    np.testing.assert_array_equal(out["a"], out["same"])  # the same resamples for every array
    assert np.all(out["const"] == 2.0)
    assert abs(out["a"].mean() - a.mean()) < 0.01 and out["a"].std() > 0
    # A 2-D array: each resample draws one seed's row, so both rows' means occur.
    two = bootstrap_means({"s": np.stack([np.zeros(500), np.ones(500)])}, 200, 2)["s"]
    assert set(np.unique(two)) == {0.0, 1.0}


def test_bootstrap_means_draws_one_seed_per_group():
    """A rule's accuracy and saving must come from the same expert seed in each resample."""
    from cnneb_jax.guarantee import bootstrap_means
    seeds = np.stack([np.zeros(300), np.ones(300), np.full(300, 2.0)])
    values = {"r:acc": seeds, "r:saving": seeds.copy(), "q:acc": seeds.copy()}
    out = bootstrap_means(values, 300, 3, groups={"r:acc": "r", "r:saving": "r"})
    np.testing.assert_array_equal(out["r:acc"], out["r:saving"])
    assert not np.array_equal(out["r:acc"], out["q:acc"])  # another group, its own draw
    with pytest.raises(ValueError, match="different numbers of seeds"):
        bootstrap_means({"a": seeds, "b": seeds[:2]}, 10, 0, groups={"a": "g", "b": "g"})
