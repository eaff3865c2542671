"""The programmatic API on a tiny trained workdir."""

import numpy as np
import pytest

from cnneb_jax import api


@pytest.fixture(scope="module")
def cascade(tiny_workdir):
    return api.load(tiny_workdir, max_batch=8)


def test_predict_uint8_and_float_agree(cascade, tiny_data):
    x = tiny_data["test_images"][:5]
    a = api.predict(cascade, x, "expert", 0.5)
    b = api.predict(cascade, x.astype(np.float32) / 255.0, "expert", 0.5)
    assert a["labels"].shape == (5,) and a["probs"].shape == (5, 10)
    np.testing.assert_allclose(a["probs"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(a["exit"], b["exit"])
    np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5)
    assert set(a["exit"]) <= {0, 1} and (a["flops"] > 0).all()


def test_single_image_and_batch_of_one(cascade, tiny_data):
    x = tiny_data["test_images"][0]
    one = api.predict(cascade, x, "max_softmax", 0.5)
    assert one["labels"].shape == (1,)
    batch_of_one = api.predict(cascade, x[None], "max_softmax", 0.5)
    np.testing.assert_array_equal(batch_of_one["probs"], one["probs"])


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 32, 32), np.uint8), "must be 32x32 with 3 channels"),
    (np.zeros((2, 32, 32, 1), np.uint8), "3 channels"),
    (np.zeros((2, 28, 28, 3), np.uint8), "32x32"),
    (np.zeros((0, 32, 32, 3), np.uint8), "empty batch"),
    (np.zeros((2, 32, 32, 3), np.int64), "uint8 or float"),
    (np.full((2, 32, 32, 3), np.nan, np.float32), "NaN or inf"),
    (np.full((2, 32, 32, 3), np.inf, np.float64), "NaN or inf"),
    (np.full((2, 32, 32, 3), 7.0, np.float32), r"\[0, 1\]"),
    (np.zeros((2, 2, 32, 32, 3), np.uint8), "shape"),
    (np.zeros((2, 3, 32, 32), np.uint8), "channels first"),
])
def test_bad_images_are_refused(cascade, images, message):
    with pytest.raises(ValueError, match=message):
        api.predict(cascade, images)


@pytest.mark.parametrize("rule, threshold, message", [
    ("expert", 1.5, r"threshold must lie in \[0, 1\]"),
    ("expert", -0.1, "threshold"),
    ("expert", float("nan"), "threshold"),
    ("magic", 0.5, "unknown rule"),
])
def test_bad_rule_or_threshold(cascade, tiny_data, rule, threshold, message):
    with pytest.raises(ValueError, match=message):
        api.predict(cascade, tiny_data["test_images"][:2], rule, threshold)


def test_calibrate_argument_errors(cascade, tiny_data):
    x, y = tiny_data["calib_images"], tiny_data["calib_labels"]
    with pytest.raises(ValueError, match="exactly one"):
        api.calibrate(cascade, x, y, "expert")
    with pytest.raises(ValueError, match="labels must have shape"):
        api.calibrate(cascade, x, y[:-1], "expert", max_drop=0.01)


def _real_accuracy_and_flops(cascade, x, y, rule, threshold):
    out = api.predict(cascade, x, rule, threshold)
    return float((out["labels"] == y).mean()), float(out["flops"].mean())


def _real_grid(cascade, x, y, rule):
    """(threshold, accuracy, FLOPs) of the real cascade at every threshold of the rule's grid."""
    from cnneb_jax.controller import all_outputs
    from cnneb_jax.sweep import branch_scores, threshold_grid
    grid = threshold_grid(branch_scores(all_outputs(cascade, x.astype(np.float32)), rule, y))
    return [(t, *_real_accuracy_and_flops(cascade, x, y, rule, float(t))) for t in grid]


@pytest.mark.parametrize("rule", ["expert", "max_softmax", "entropy"])
@pytest.mark.parametrize("max_drop", [0.0, 0.15, 0.4])
def test_calibrated_point_meets_the_drop_and_nothing_cheaper_does(cascade, tiny_data, rule,
                                                                  max_drop):
    """On the images it was chosen on, the real cascade at the chosen threshold stays within
    `max_drop` of the last exit, and no threshold of the rule's grid that is cheaper does."""
    x, y = tiny_data["calib_images"], tiny_data["calib_labels"]
    p = api.calibrate(cascade, x, y, rule, max_drop=max_drop)
    acc, flops = _real_accuracy_and_flops(cascade, x, y, rule, p["threshold"])
    ref = p["reference_accuracy"]
    assert acc >= ref - max_drop - 1e-9
    assert acc == pytest.approx(p["accuracy"]) and flops == pytest.approx(p["flops"])
    for t, a, f in _real_grid(cascade, x, y, rule):
        if f < flops - 1e-6:
            assert a < ref - max_drop - 1e-9, (t, a, f)


def test_calibrated_budget_point_is_the_most_accurate_within_budget(cascade, tiny_data):
    x, y = tiny_data["calib_images"], tiny_data["calib_labels"]
    ref = api.calibrate(cascade, x, y, "entropy", max_drop=1.0)
    budget = 0.5 * (ref["flops"] + ref["reference_flops"])
    q = api.calibrate(cascade, x, y, "entropy", flops_budget=budget)
    acc, flops = _real_accuracy_and_flops(cascade, x, y, "entropy", q["threshold"])
    assert flops <= budget + 1e-6
    for t, a, f in _real_grid(cascade, x, y, "entropy"):
        if f <= budget + 1e-6:
            assert a <= acc + 1e-9, (t, a, f)
