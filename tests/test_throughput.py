"""Throughput mode: answers equal api.predict's, in request order; deep segments run on
full buckets; the wait bound; bad arguments."""

import jax
import numpy as np
import pytest

from cnneb_jax import api, throughput
from cnneb_jax.configs import get_config
from cnneb_jax.controller import all_outputs
from cnneb_jax.programs import make_cascade
from cnneb_jax.model import build_model, init_variables
from cnneb_jax.sweep import branch_scores, route


def _cascade(branch_points="Mixed_5b", max_batch=16, expert_scale=1.0):
    model = build_model(get_config("tiny", {"branch_points": branch_points}))
    v = init_variables(model, jax.random.PRNGKey(0))
    # Scaled experts spread their scores, so one threshold can use every exit of an
    # untrained network.
    v["experts"] = jax.tree_util.tree_map(lambda a: a * expert_scale, v["experts"])
    return make_cascade(model, v, max_batch)


def _batches(sizes=(5, 11, 3, 16, 20, 7, 1, 9), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8) for n in sizes]


def _varied_batches(sizes=(5, 11, 3, 16, 20, 7, 1, 9), seed=1):
    """Images with a colour and a gradient of their own: an untrained network's deeper
    features hardly vary over uniform noise, and then no threshold splits E2's samples."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32][..., None] / 31.0
    out = []
    for n in sizes:
        base = rng.uniform(0, 255, (n, 1, 1, 3))
        dy, dx = rng.uniform(-128, 128, (2, n, 1, 1, 3))
        img = base + dy * yy + dx * xx + rng.normal(0, 8, (n, 32, 32, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def cascade():
    return _cascade()


def _mixed_threshold(c, images, rule):
    """The middle one of the thresholds at which every exit takes some samples."""
    scores = branch_scores(all_outputs(c, images), rule)
    ok = [t for t in np.sort(np.concatenate(scores))
          if len(np.unique(route(scores, t))) == c.model.num_exits]
    assert ok, "no threshold uses every exit"
    return float(ok[len(ok) // 2])


def _record_deep_runs(monkeypatch):
    sizes = []
    real = throughput.branch

    def spy(c, i, variant, x):
        if i > 0:
            sizes.append(x.shape[0])
        return real(c, i, variant, x)
    monkeypatch.setattr(throughput, "branch", spy)
    return sizes


@pytest.mark.parametrize("wait", [0.0, 1e3])
@pytest.mark.parametrize("rule", ["expert", "entropy"])
def test_answers_equal_predict_in_request_order(cascade, rule, wait):
    batches = _batches()
    t = _mixed_threshold(cascade, np.concatenate(batches), rule)
    outs = list(throughput.serve(cascade, batches, rule, t, max_wait_s=wait))
    assert len(outs) == len(batches)
    for b, out in zip(batches, outs):
        ref = api.predict(cascade, b, rule, t)
        np.testing.assert_array_equal(out["exit"], ref["exit"])
        np.testing.assert_array_equal(out["labels"], ref["labels"])
        np.testing.assert_allclose(out["probs"], ref["probs"], atol=1e-5)
        np.testing.assert_allclose(out["flops"], ref["flops"])


def test_three_exits():
    c = _cascade("Mixed_5b,Mixed_6e", expert_scale=10.0)
    batches = _varied_batches()
    t = _mixed_threshold(c, np.concatenate(batches), "expert")
    outs = list(throughput.serve(c, batches, "expert", t, max_wait_s=1e3))
    exits = np.concatenate([o["exit"] for o in outs])
    assert set(exits) == {0, 1, 2}
    for b, out in zip(batches, outs):
        np.testing.assert_array_equal(out["exit"], api.predict(c, b, "expert", t)["exit"])


def test_deep_segment_runs_on_full_buckets(cascade, monkeypatch):
    batches = _batches((6,) * 12)
    t = _mixed_threshold(cascade, np.concatenate(batches), "entropy")
    sizes = _record_deep_runs(monkeypatch)
    outs = list(throughput.serve(cascade, batches, "entropy", t, max_wait_s=1e3))
    deep = int(sum((o["exit"] == 1).sum() for o in outs))
    assert deep > cascade.max_batch
    # Every run but the final flush is a full bucket; together they run each deep sample once.
    assert all(s == cascade.max_batch for s in sizes[:-1])
    assert deep // cascade.max_batch == len(sizes) - 1


def test_zero_wait_runs_each_batch_at_once(cascade, monkeypatch):
    batches = _batches((6,) * 5)
    t = _mixed_threshold(cascade, np.concatenate(batches), "entropy")
    sizes = _record_deep_runs(monkeypatch)
    outs = list(throughput.serve(cascade, batches, "entropy", t, max_wait_s=0.0))
    went_deep = [int((o["exit"] == 1).sum()) for o in outs]
    assert len(sizes) == sum(1 for n in went_deep if n)   # one deep run per batch that has some


def test_bad_arguments(cascade):
    with pytest.raises(ValueError, match="max_wait_s"):
        list(throughput.serve(cascade, _batches((2,)), "entropy", 0.5, max_wait_s=-1))
    with pytest.raises(ValueError, match="oracle"):
        list(throughput.serve(cascade, _batches((2,)), "oracle", 0.5))
    with pytest.raises(ValueError, match="no rule given"):
        list(throughput.serve(cascade, _batches((2,))))
    with pytest.raises(ValueError, match="images must be"):
        list(throughput.serve(cascade, [np.zeros((2, 3, 32, 32), np.uint8)], "entropy", 0.5))
