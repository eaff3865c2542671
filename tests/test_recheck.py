"""recheck.py: choosing the top-2 margins below which bfloat16's answers are rerun."""

import numpy as np
import pytest

from cnneb_jax import recheck


def _logits(top: list[int], margins: list[float], k: int = 4) -> np.ndarray:
    """Rows whose softmax puts class `top` first with the given top-2 margin."""
    out = np.full((len(top), k), -20.0, np.float32)
    for r, (t, m) in enumerate(zip(top, margins)):
        # two classes share (nearly) all the mass: p1 - p2 = m
        p1, p2 = (1 + m) / 2, (1 - m) / 2
        out[r, t], out[r, (t + 1) % k] = np.log(p1), np.log(p2)
    return out


def test_top2_margin():
    got = recheck.top2_margin(_logits([0, 2, 3], [0.5, 0.1, 0.9]))
    np.testing.assert_allclose(got, [0.5, 0.1, 0.9], atol=1e-5)


def test_choose_margin_catches_every_changed_label_or_all_but_the_allowed():
    # Rows 1 and 3 change label in bfloat16 (margins 0.02 and 0.07); the rest agree.
    low = _logits([0, 1, 2, 3, 0, 1, 2, 3, 0, 1], [.3, .02, .5, .07, .6, .01, .4, .8, .2, .9])
    ref = low.copy()
    ref[[1, 3]] = _logits([2, 0], [.5, .5])
    t = recheck.choose_margin(low, ref, 1.0)
    again = recheck.close_calls(low, t)
    assert again[[1, 3]].all() and again.sum() == 3     # row 5 (0.01) is caught as well
    assert 0.07 < t < 0.0701
    # 90% asked of 10 rows: one changed label may stay, the one with the larger margin.
    t90 = recheck.choose_margin(low, ref, 0.9)
    assert recheck.close_calls(low, t90)[1] and not recheck.close_calls(low, t90)[3]
    assert recheck.choose_margin(low, low, 1.0) == 0.0    # nothing changes: no reruns
    with pytest.raises(ValueError, match="target agreement"):
        recheck.choose_margin(low, ref, 0.0)


def test_choose_margins_reports_what_the_margins_give():
    low = [_logits([0, 1, 2, 3], [.3, .02, .5, .07])] * 2
    ref = [low[0].copy(), _logits([0, 2, 2, 3], [.3, .5, .5, .07])]
    point = recheck.choose_margins(low, ref, 1.0)
    assert point["margins"][0] == 0.0 and 0.0199 < point["margins"][1] < 0.0201
    assert point["heldout_same_label_bfloat16"] == [1.0, 0.75]
    assert point["heldout_same_label_checked"] == [1.0, 1.0]
    assert point["heldout_rerun"] == [0.0, 0.25] and point["images"] == 4


def test_read_margins_refuses_what_does_not_fit():
    assert recheck.read_margins({"margins": [0.1, 0]}, 2) == (0.1, 0.0)
    for bad in ({"margins": [0.1]}, {"margins": [0.1, 2.0]}, {"margins": "x"}, {}):
        with pytest.raises(ValueError, match="one margin in"):
            recheck.read_margins(bad, 2)
