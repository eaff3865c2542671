"""The early-exit controller: exactness of routing and no recompilation after warm-up."""

import jax
import numpy as np
import pytest
from jax import monitoring

from cnneb_jax.configs import get_config
from cnneb_jax.controller import all_outputs, path_flops, run_cascade, run_plain
from cnneb_jax.programs import bucket_for, bucket_sizes, make_cascade, warm_up
from cnneb_jax.model import build_model, init_variables

TOL = dict(rtol=2e-4, atol=2e-4)


def _cascade(cfg, max_batch=16, seed=0):
    model = build_model(cfg)
    # Random BatchNorm statistics so that eval-mode outputs are not degenerate.
    v = init_variables(model, jax.random.PRNGKey(seed))
    return make_cascade(model, v, max_batch)


@pytest.fixture(scope="module")
def cascade():
    return _cascade(get_config("tiny"))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (11, 32, 32, 3)).astype(np.uint8)


def test_bucket_sizes():
    assert bucket_sizes(256) == (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256)
    assert bucket_sizes(5) == (1, 2, 4, 5)


def test_everything_exits_early_gives_o1(cascade, images):
    out = run_cascade(cascade, images, "max_softmax", 0.0)
    full = all_outputs(cascade, images)
    assert (out["exit"] == 0).all()
    np.testing.assert_allclose(out["logits"], full["exits"][0], **TOL)
    np.testing.assert_allclose(out["flops"], path_flops(cascade, "max_softmax")[0])


def test_nothing_exits_gives_the_full_network(cascade, images):
    for rule in ("expert", "aux5b", "max_softmax", "entropy"):
        out = run_cascade(cascade, images, rule, 1.0)
        assert (out["exit"] == 1).all()
        np.testing.assert_allclose(out["logits"], all_outputs(cascade, images)["exits"][1], **TOL)


@pytest.mark.parametrize("rule", ["expert", "aux5b", "max_softmax", "entropy"])
def test_each_sample_equals_running_it_alone(cascade, images, rule):
    full = all_outputs(cascade, images)
    from cnneb_jax.sweep import branch_scores
    # A threshold in the middle of the scores, so both paths are taken.
    t = float(np.median(branch_scores(full, rule)[0]))
    out = run_cascade(cascade, images, rule, t)
    assert 0 < (out["exit"] == 0).sum() < len(images)
    for i in range(len(images)):
        alone = run_cascade(cascade, images[i:i + 1], rule, t)
        assert alone["exit"][0] == out["exit"][i]
        np.testing.assert_allclose(alone["logits"][0], out["logits"][i], **TOL)
        np.testing.assert_allclose(out["logits"][i], full["exits"][out["exit"][i]][i], **TOL)


def test_three_exits_route_through_both_experts():
    c = _cascade(get_config("tiny", {"branch_points": "Mixed_5b,Mixed_6e"}))
    x = np.random.default_rng(1).integers(0, 256, (9, 32, 32, 3)).astype(np.uint8)
    full = all_outputs(c, x)
    from cnneb_jax.sweep import branch_scores, route
    scores = branch_scores(full, "entropy")
    t = float(np.median(np.concatenate(scores)))
    for max_batch in (16, 2):   # one chunk; chunks whose deep rows queue at both segments
        c = make_cascade(c.model, c.variables, max_batch)
        out = run_cascade(c, x, "entropy", t)
        np.testing.assert_array_equal(out["exit"], route(scores, t))
        for i, e in enumerate(out["exit"]):
            np.testing.assert_allclose(out["logits"][i], full["exits"][e][i], **TOL)
    assert path_flops(c, "entropy").shape == (3,)


@pytest.mark.parametrize("rule", ["expert", "max_softmax"])
def test_deep_rows_wait_for_a_full_bucket_across_chunks(images, rule):
    from cnneb_jax.sweep import branch_scores
    c = _cascade(get_config("tiny"), max_batch=4)   # buckets 1, 2, 4
    x = np.concatenate([images, images])            # 22 images: 5 chunks of 4, one of 2
    full = all_outputs(c, x)
    t = float(np.quantile(branch_scores(full, rule)[0], 0.4))
    out = run_cascade(c, x, rule, t)
    deep = int((out["exit"] == 1).sum())
    assert 0 < deep < len(x)
    for i, e in enumerate(out["exit"]):
        np.testing.assert_allclose(out["logits"][i], full["exits"][e][i], **TOL)
    # Every image ran the first program (the last chunk as a bucket of 2); the deep rows
    # ran in full buckets of 4 across chunks, and only their last, partial bucket padded.
    tail = bucket_for(c, deep % 4) if deep % 4 else 0
    assert out["rows_run"].tolist() == [22, 4 * (deep // 4) + tail]


def test_oracle_needs_labels_and_sends_ft_deep(cascade, images):
    with pytest.raises(ValueError, match="needs labels"):
        run_cascade(cascade, images, "oracle", 0.5)
    labels = all_outputs(cascade, images)["exits"][1].argmax(-1)  # O2 always right
    out = run_cascade(cascade, images, "oracle", 0.5, labels)
    o1 = all_outputs(cascade, images)["exits"][0].argmax(-1)
    np.testing.assert_array_equal(out["exit"] == 1, o1 != labels)


def test_no_compilation_during_a_sweep_after_warm_up(images):
    """With `reference`, warm_up also compiles the plain networks the sweep times the
    cascade against, so no timed round pays a compile."""
    c = _cascade(get_config("tiny"), max_batch=8)
    warm_up(c, reference=True)
    compiles = []
    monitoring.register_event_duration_secs_listener(
        lambda name, d, **kw: compiles.append(name)
        if name == "/jax/core/compile/backend_compile_duration" else None)
    x = np.concatenate([images, images])  # 22 images: chunks of 8, 8, 6
    for rule in ("expert", "aux5b", "max_softmax", "entropy"):
        for t in np.linspace(0, 1, 11):
            run_cascade(c, x, rule, float(t))
            run_cascade(c, x[:1], rule, float(t))
    plain = {i: run_plain(c, x, i) for i in (0, 1)}
    for exit_index in (0, 1):
        for n in (5, 1):
            run_plain(c, x[:n], exit_index)
    assert compiles == []
    # The reference is each plain network's own logits (chunks of 8, 8, 6 read at the end).
    exits = all_outputs(c, x)["exits"]
    for i in (0, 1):
        np.testing.assert_allclose(plain[i], exits[i], rtol=1e-4, atol=1e-4)


def test_branch_programs_are_traced_once_per_config(images, tmp_path, monkeypatch):
    """A second cascade of the same config (a new process, in effect) reads the traced
    branch programs from the cache folder instead of tracing the model again."""
    monkeypatch.setenv("CNNEB_COMPILE_CACHE", str(tmp_path))
    exports = []
    real = jax.export.export

    def counting(*a, **kw):
        exports.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(jax.export, "export", counting)
    first = run_cascade(_cascade(get_config("tiny")), images, "expert", 1.0)  # all go deep
    assert len(exports) == 2                    # the expert program of each segment
    second = run_cascade(_cascade(get_config("tiny")), images, "expert", 1.0)
    assert len(exports) == 2
    np.testing.assert_array_equal(first["exit"], second["exit"])
    np.testing.assert_allclose(first["logits"], second["logits"], rtol=1e-6, atol=1e-6)


def test_smallest_buckets_run_xlas_kernels(cascade, images):
    """Below `onednn_min_batch` a bucket's program is lowered from the same network on
    XLA's kernels (oneDNN's are slower there, docs/experiments.md §20), and it routes the
    same images to the same exits with the same outputs, up to float rounding."""
    from cnneb_jax import onednn
    from cnneb_jax.programs import _exported, _kernel_model
    c, cfg = cascade, cascade.model.cfg
    assert _kernel_model(c, cfg.onednn_min_batch) is c.model
    small = _kernel_model(c, 1)
    assert small.cfg == cfg.replace(onednn="off") and _kernel_model(c, 4) is small
    x = np.zeros((1, 32, 32, 3), np.float32)
    x8 = np.zeros((8, 32, 32, 3), np.float32)
    one, eight = (_exported(c, 0, "plain", a).mlir_module() for a in (x, x8))
    assert "cnneb_onednn" not in one
    if onednn.use(cfg.onednn, np.float32):
        assert "cnneb_onednn" in eight
    off = _cascade(cfg.replace(onednn="off"))
    assert _kernel_model(off, 1) is off.model
    for n in (1, 3, 11):   # buckets 1, 4 (XLA's kernels) and 16 (oneDNN's where built)
        a = run_cascade(c, images[:n], "max_softmax", 0.5)
        b = run_cascade(off, images[:n], "max_softmax", 0.5)
        np.testing.assert_array_equal(a["exit"], b["exit"])
        np.testing.assert_allclose(a["logits"], b["logits"], **TOL)
