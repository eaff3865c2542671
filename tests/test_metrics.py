import itertools

import numpy as np

from cnneb_jax.metrics import ft_labels, roc_auc


def test_ft_labels():
    y = np.array([0, 1, 2, 3])
    o1 = np.array([0, 0, 0, 0])   # right, wrong, wrong, wrong
    o2 = np.array([0, 1, 0, 3])   # right, right, wrong, right
    np.testing.assert_array_equal(ft_labels([o1, o2], y, 0), [0, 1, 0, 1])


def test_ft_labels_with_three_exits_counts_any_later_exit():
    y = np.array([1, 1])
    preds = [np.array([0, 0]), np.array([1, 0]), np.array([0, 0])]
    np.testing.assert_array_equal(ft_labels(preds, y, 0), [1, 0])


def test_roc_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    pos = rng.random(60) < 0.3
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0)
             for a, b in itertools.product(s[pos], s[~pos])]
    assert abs(roc_auc(s, pos) - np.mean(pairs)) < 1e-12
    assert roc_auc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([True, True])))
