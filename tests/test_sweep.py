import numpy as np
import pytest

from cnneb_jax.sweep import choose_threshold, evaluate_point, pr_roc, route, threshold_grid


def _outputs():
    # 6 samples, 2 exits, 3 classes; labels 0..; O1 right on 0,1,2; O2 right on all but 5.
    o1 = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 3.0
    o2 = np.eye(3)[[0, 1, 2, 0, 1, 0]] * 3.0
    labels = np.array([0, 1, 2, 0, 1, 2])
    return {"exits": [o1, o2], "experts": [np.zeros((6, 2))], "aux5b": [np.zeros((6, 2))]}, labels


def test_route_first_branch_over_threshold():
    scores = [np.array([0.9, 0.1, 0.1]), np.array([0.0, 0.8, 0.1])]
    np.testing.assert_array_equal(route(scores, 0.5), [0, 1, 2])


def test_evaluate_point_counts_exits_and_cost():
    out, y = _outputs()
    costs = np.array([1.0, 4.0])
    scores = [np.array([0.9, 0.9, 0.9, 0.1, 0.9, 0.9])]
    p = evaluate_point(out, y, scores, 0.5, costs)
    # exits: [0,0,0,1,0,0]; answers: O1 right on 0,1,2,4; O2 right on 3; sample 5 wrong.
    assert p["accuracy"] == pytest.approx(5 / 6)
    assert p["flops"] == pytest.approx((5 * 1 + 4) / 6)
    assert p["share_exit1"] == pytest.approx(5 / 6)


def test_choose_threshold_targets():
    pts = [{"accuracy": 0.90, "flops": 10.0}, {"accuracy": 0.89, "flops": 6.0},
           {"accuracy": 0.87, "flops": 4.0}]
    assert choose_threshold(pts, 0.90, max_drop=0.01)["flops"] == 6.0
    assert choose_threshold(pts, 0.90, max_drop=0.05)["flops"] == 4.0
    assert choose_threshold(pts, 0.90, flops_budget=7.0)["accuracy"] == 0.89
    assert choose_threshold(pts, 0.99, max_drop=0.001) is None
    with pytest.raises(ValueError):
        choose_threshold(pts, 0.9)


def test_grid_spans_zero_to_one():
    g = threshold_grid([np.random.default_rng(0).random(100)])
    assert g[0] == 0.0 and g[-1] == 1.0 and np.all(np.diff(g) > 0)


def test_pr_roc_of_a_perfect_score():
    out, y = _outputs()
    # FT samples (O1 wrong, O2 right): only sample 3. A score low only there is perfect.
    out["experts"] = [np.array([[0.0, 1.0]] * 3 + [[1.0, 0.0]] + [[0.0, 1.0]] * 2)]
    cv = pr_roc(out, y, "expert")
    assert cv["auc"] == 1.0 and cv["precision"][4] == 1.0
