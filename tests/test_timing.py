"""Timing helpers: interleaved rounds in a random order, paired single-image latency."""

import numpy as np

from cnneb_jax.timing import paired_batch, paired_single


def test_paired_batch_interleaves_rounds_in_a_random_order():
    calls = []
    runs = {k: (lambda x, k=k: calls.append((k, len(x)))) for k in "abc"}
    sec = paired_batch(np.zeros((8, 2)), runs, repeats=12, seed=0)
    assert {k: v.shape for k, v in sec.items()} == {k: (12,) for k in "abc"}
    assert calls[:3] == [("a", 2), ("b", 2), ("c", 2)]  # each warmed once, on a quarter
    rounds = [tuple(k for k, _ in calls[3 + 3 * r:6 + 3 * r]) for r in range(12)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every run once per round
    assert len(set(rounds)) > 1 and len({r[0] for r in rounds}) > 1  # not a fixed order
    again = []
    paired_batch(np.zeros((8, 2)), {k: (lambda x, k=k: again.append(k)) for k in "abc"}, 12, 0)
    assert [k for k, _ in calls] == again  # seeded


def test_paired_single_alternates_which_goes_first():
    order = []
    out = paired_single(np.zeros((4, 2)), lambda x: order.append("ref"),
                        lambda x: order.append("pt"))
    assert order[2:] == ["ref", "pt", "pt", "ref", "ref", "pt", "pt", "ref"]
    assert set(out) >= {"ms_single_mean", "ref_single_mean", "single_saving"}
