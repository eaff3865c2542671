"""The backbone's and experts' self-report (cnneb_jax/diagnostics.py)."""

import numpy as np

from cnneb_jax import diagnostics


def _logits(pred, k):
    return np.eye(k)[pred] * 5.0


def test_the_exit_gap_warns_only_when_the_deep_exit_is_not_clearly_better():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    o1 = np.where(rng.random(400) < 0.6, y, (y + 1) % 4)
    better = np.where(rng.random(400) < 0.9, y, (y + 1) % 4)
    gap = diagnostics.exit_gap([_logits(o1, 4), _logits(better, 4)], y)
    assert gap["difference"] > 0.2 and diagnostics.exit_gap_warning(gap) is None
    level = diagnostics.exit_gap([_logits(o1, 4), _logits(o1, 4)], y)
    warning = diagnostics.exit_gap_warning(level)
    assert level["difference"] == 0 and "O2 is not better than O1" in warning
    assert "flip=none" in warning


def test_the_class_report_names_the_worst_classes_and_the_mirror_pairs():
    names = ["left", "right", "stop", "yield"]
    y = np.repeat(np.arange(4), 10)
    pred = y.copy()
    pred[:4] = 1          # left read as right, 4 times
    pred[10:13] = 0       # right read as left, 3 times
    pred[20] = 3          # stop read as yield, once
    report = diagnostics.class_report(_logits(pred, 4), y, names, worst=2, pairs=2)
    assert [w["class"] for w in report["worst"]] == ["left", "right"]
    assert report["per_class"]["left"] == 0.6 and report["per_class"]["yield"] == 1.0
    assert report["confused_pairs"][0] == {"classes": ["left", "right"], "errors": 7}
    assert report["confused_pairs"][1]["classes"] == ["stop", "yield"]


def test_an_expert_ranking_worse_than_max_softmax_is_named_with_the_rule_to_serve():
    rng = np.random.default_rng(1)
    n = 300
    y = rng.integers(0, 3, n)
    conf = rng.random(n)
    o1 = np.where(conf > 0.3, y, (y + 1) % 3)          # O1 wrong when its confidence is low
    exits = [np.eye(3)[o1] * (1 + 4 * conf[:, None]), np.eye(3)[y] * 5.0]
    noise = rng.normal(size=(n, 2))                    # an expert that knows nothing
    rows = diagnostics.expert_vs_max_softmax({"exits": exits, "experts": [noise]}, y)
    assert rows[0]["max_softmax_auc"] > 0.9 and rows[0]["expert_auc"] < 0.7
    assert "serve with rule max_softmax" in diagnostics.expert_warning(rows[0])
    good = np.stack([-conf, conf], -1) * 10            # ranks as max softmax does
    rows = diagnostics.expert_vs_max_softmax({"exits": exits, "experts": [good]}, y)
    assert diagnostics.expert_warning(rows[0]) is None


def test_imbalanced_training_classes_are_named_unless_the_loss_is_weighted():
    from cnneb_jax.diagnostics import imbalance_warning
    names = ["a", "b", "c"]
    labels = np.array([0] * 30 + [1] * 12 + [2] * 9)
    warning = imbalance_warning(labels, names, "none")
    assert "a has 30 images, c 9 (3.3x)" in warning and "class_balance=loss" in warning
    assert imbalance_warning(labels, names, "loss") is None
    assert imbalance_warning(np.array([0] * 20 + [1] * 8 + [2] * 12), names, "none") is None
