"""The expert stage on a handful of real images: end to end, what the step updates, its
warnings, experts on another workdir's backbone."""

import json
import shutil

import jax
import numpy as np
import pytest

from cnneb_jax.backbone_stage import train_backbone
from cnneb_jax.expert_stage import train_expert
from cnneb_jax.workdir import TrainingError, load_backbone, load_trained

from conftest import leaves_equal


@pytest.fixture(scope="module")
def trained(tiny_run):
    return tiny_run


def test_expert_stage_end_to_end(trained, tiny_cfg):
    workdir, _, e = trained
    assert {"experts_E1", "aux5b_E1", "max_softmax_O1"} <= set(e["test_auc_other_vs_ft"])
    assert len(e["heldout_ft_examples"]) == 1 and e["heldout_ft_examples"][0] >= 0
    [versus] = e["heldout_expert_vs_max_softmax"]
    assert versus["ft_examples"] == e["heldout_ft_examples"][0]
    model, full = load_trained(workdir)
    assert set(full) == {"segments", "heads", "experts", "aux5b"}


def test_expert_stage_warns_of_few_or_leaked_ft_examples(capsys):
    from cnneb_jax.expert_stage import _warn_leak
    _warn_leak([0.005], [0.023], 10_000)   # the leak seen on a split of video frames
    assert "held-out images look leaked" in capsys.readouterr().err
    _warn_leak([0.02], [0.023], 10_000)
    _warn_leak([0.0], [0.02], 100)         # too few test FT examples to tell
    assert capsys.readouterr().err == ""


def test_e1_is_judged_against_max_softmax_on_the_heldout_split_not_calibration(monkeypatch):
    # The calibration split certifies the operating point; choosing the rule on it too would
    # break Learn-then-Test's assumption of a model fixed independently of it.
    from cnneb_jax import expert_stage
    seen = []

    def fake_predict_all(model, variables, images, batch_size, predict=None):
        seen.append(images)
        n = len(images)
        return {"exits": [np.zeros((n, 3)), np.zeros((n, 3))], "experts": [np.zeros((n, 2))]}

    monkeypatch.setattr(expert_stage, "predict_all", fake_predict_all)
    data = {"val_images": np.zeros((5, 4, 4, 3)), "val_labels": np.zeros(5, int),
            "calib_images": np.ones((7, 4, 4, 3)), "calib_labels": np.zeros(7, int)}
    expert_stage._check_against_rule(None, None, data, 8)
    assert len(seen) == 1 and seen[0] is data["val_images"]


def test_expert_step_updates_only_the_experts(trained, tiny_cfg, tiny_data):
    """One expert step at a real learning rate: every expert kind moves, while O1 and O2
    (and the backbone's BatchNorm statistics) give bit-identical outputs afterwards."""
    import optax
    from cnneb_jax.model import (EXPERT_GROUPS, init_variables, merge_collections,
                                 split_collections)
    from cnneb_jax.expert_stage import make_expert_step
    from cnneb_jax.evaluation import make_predict_fn

    model, backbone = load_backbone(trained[0], tiny_cfg)
    variables = init_variables(model, jax.random.PRNGKey(1))
    params, stats = split_collections({g: variables[g] for g in EXPERT_GROUPS})
    tx = optax.sgd(0.5)
    step = make_expert_step(model, tiny_cfg, tx)
    x, y = tiny_data["val_images"][:8], tiny_data["val_labels"][:8]
    class_w = jax.numpy.ones((1, 2))
    new, _ = step({"params": params, "stats": stats, "opt": tx.init(params)}, x, y,
                  jax.random.PRNGKey(0), class_w, backbone)
    # Only expert parameters and expert BatchNorm statistics come out of the step.
    assert set(new["params"]) == set(new["stats"]) == set(EXPERT_GROUPS)
    for g in EXPERT_GROUPS:
        assert not leaves_equal(params[g], new["params"][g]), f"{g} did not move"
    predict = make_predict_fn(model)
    before = predict({**backbone, **{g: variables[g] for g in EXPERT_GROUPS}}, x)
    after = predict({**backbone, **merge_collections(new["params"], new["stats"])}, x)
    for a, b in zip(before["exits"], after["exits"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(before["experts"][0]), np.asarray(after["experts"][0]))


def test_tiny_expert_learns_ft_vs_other(trained, tiny_cfg, tiny_data):
    """The tiny expert stage really trains: on its own training data E1 ranks Other above FT
    better than chance, and its class-balanced loss is below ln 2, what the best constant
    answer gets. Its training data are augmented views of the held-out images, with FT
    labels computed per view, so it is scored on 20 such views. (The logged per-step losses
    are too noisy to compare: a tiny batch holds a handful of FT views, and how many
    depends on float rounding, so on the JAX version.)"""
    from cnneb_jax.augment import augment
    from cnneb_jax.heads import OTHER
    from cnneb_jax.metrics import ft_labels, roc_auc
    from cnneb_jax.expert_stage import balanced_expert_loss, class_weights
    from cnneb_jax.evaluation import make_predict_fn

    workdir = trained[0]
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [l["loss"] for l in lines if l.get("stage") == "expert" and "loss" in l]
    assert len(losses) >= 4 and np.all(np.isfinite(losses))
    model, full = load_trained(workdir)
    predict = make_predict_fn(model)
    x, y = tiny_data["val_images"], tiny_data["val_labels"]
    other, logits = [], []
    for k in range(20):
        out = predict(full, augment(jax.random.PRNGKey(100 + k), x, tiny_cfg.pad_crop))
        preds = [np.asarray(o).argmax(-1) for o in out["exits"]]
        other.append(ft_labels(preds, y, 0) == 0)
        logits.append(np.asarray(out["experts"][0]))
    other, logits = np.concatenate(other), np.concatenate(logits)
    assert 10 <= (~other).sum() < len(other) - 10, "too few FT or Other examples to judge"
    score = np.asarray(jax.nn.softmax(logits, axis=-1)[:, OTHER])
    assert roc_auc(score, other) > 0.65
    loss = balanced_expert_loss(logits, np.where(other, OTHER, 1 - OTHER),
                                class_weights(~other))
    assert float(loss) < np.log(2)


def test_expert_needs_a_backbone(tiny_cfg, tiny_data, tmp_path):
    with pytest.raises(TrainingError, match="no finished backbone"):
        train_expert(tiny_cfg, tiny_data, tmp_path)


def test_experts_train_on_the_backbone_of_another_workdir(trained, tiny_cfg, tiny_data,
                                                           tiny_ablation, tmp_path):
    from cnneb_jax.workdir import backbone_source
    assert backbone_source(tiny_ablation) == trained[0].resolve()
    assert not (tiny_ablation / "backbone").exists()  # nothing of its own
    _, own = load_trained(trained[0])
    _, linked = load_trained(tiny_ablation)
    assert leaves_equal({g: own[g] for g in ("segments", "heads")},
                         {g: linked[g] for g in ("segments", "heads")})
    # Its experts are the ablation's: E1 takes fewer inputs, so it has fewer weights.
    size = lambda v: sum(x.size for x in jax.tree_util.tree_leaves(v["experts"]))
    assert size(linked) < size(own)
    # The link survives a move of both folders together (it is stored relative).
    moved = tmp_path / "moved"
    shutil.copytree(trained[0], moved / trained[0].name)
    shutil.copytree(tiny_ablation, moved / tiny_ablation.name)
    _, again = load_trained(moved / tiny_ablation.name)
    assert backbone_source(moved / tiny_ablation.name) == (moved / trained[0].name).resolve()
    assert leaves_equal(again, linked)
    # A linked workdir trains no backbone; a backbone field that differs is refused.
    with pytest.raises(TrainingError, match="takes its backbone from"):
        train_backbone(tiny_cfg.replace(expert_inputs="paper"), tiny_data, tiny_ablation)
    with pytest.raises(TrainingError, match="width"):
        train_expert(tiny_cfg.replace(width=0.125), tiny_data, tmp_path / "w",
                     backbone_from=trained[0])
    assert not (tmp_path / "w").exists()   # a refused link leaves nothing behind
    with pytest.raises(TrainingError, match="own"):
        train_expert(tiny_cfg, tiny_data, trained[0], backbone_from=tiny_ablation)


def test_cached_views_are_reproducible_augmented_and_give_the_fresh_step(trained, tiny_cfg,
                                                                          tiny_data):
    """`expert_views`: the views are the same on every call (a resumed run rebuilds them),
    differ from view to view, and without augmentation one cached step equals one fresh
    step on the same images (up to the float16 the features are stored in)."""
    import optax
    from cnneb_jax.model import EXPERT_GROUPS, init_variables, split_collections
    from cnneb_jax.expert_stage import (cache_views, make_cached_expert_step,
                                        make_expert_step)

    model, backbone = load_backbone(trained[0], tiny_cfg)
    x, y = tiny_data["val_images"][:8], tiny_data["val_labels"][:8]
    a = cache_views(model, tiny_cfg, backbone, x, y, views=2, batch_size=5)
    b = cache_views(model, tiny_cfg, backbone, x, y, views=2, batch_size=5)
    assert a["feats"][0].shape[0] == a["logits"][0].shape[0] == len(a["targets"][0]) == 16
    assert a["feats"][0].dtype == np.float16
    assert leaves_equal(a, b)
    assert not np.array_equal(a["logits"][0][:8], a["logits"][0][8:])

    plain = tiny_cfg.replace(pad_crop=0, flip="none")
    cache = cache_views(model, plain, backbone, x, y, views=1, batch_size=8)
    variables = init_variables(model, jax.random.PRNGKey(1))
    params, stats = split_collections({g: variables[g] for g in EXPERT_GROUPS})
    tx = optax.sgd(0.5)
    state = {"params": params, "stats": stats, "opt": tx.init(params)}
    class_w = jax.numpy.ones((1, 2))
    fresh, m1 = make_expert_step(model, plain, tx)(state, x, y, jax.random.PRNGKey(0),
                                                   class_w, backbone)
    cached, m2 = make_cached_expert_step(model, tx)(state, np.arange(8), y,
                                                    jax.random.PRNGKey(0), class_w,
                                                    backbone, cache)
    assert float(m1["ft_rate_E1"]) == float(m2["ft_rate_E1"])
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-2)
    for f, c in zip(jax.tree_util.tree_leaves(fresh["params"]),
                    jax.tree_util.tree_leaves(cached["params"])):
        np.testing.assert_allclose(np.asarray(f), np.asarray(c), rtol=1e-2, atol=1e-3)


def test_expert_stage_trains_from_cached_views(trained, tiny_cfg, tiny_data, tmp_path,
                                               monkeypatch):
    """With cached views, and with Aux+5b on a shorter budget (`aux5b_epochs`): both kinds
    train until its budget ends, then E1 alone; the loop runs E1's epochs."""
    from cnneb_jax import expert_stage
    from cnneb_jax.model import EXPERT_GROUPS
    made = []
    real = expert_stage.make_cached_expert_step
    monkeypatch.setattr(expert_stage, "make_cached_expert_step",
                        lambda model, tx, kinds: made.append(kinds) or real(model, tx, kinds))
    cfg = tiny_cfg.replace(expert_views=3, aux5b_epochs=7)
    result = train_expert(cfg, tiny_data, tmp_path / "views", backbone_from=trained[0])
    assert made == [EXPERT_GROUPS, ("experts",)]
    n, bs = len(tiny_data["val_labels"]), min(cfg.expert_batch_size, len(tiny_data["val_labels"]))
    # expert_epochs passes over the held-out images, read as epochs / views passes over
    # all the views
    assert result["steps"] == (cfg.expert_epochs // 3) * (3 * n // bs)
    assert {"experts_E1", "aux5b_E1"} <= set(result["test_auc_other_vs_ft"])
    with pytest.raises(ValueError, match="multiple of expert_views"):
        from cnneb_jax.configs import validate
        validate(tiny_cfg.replace(expert_views=4))
    with pytest.raises(ValueError, match="aux5b_epochs .31. must be a multiple"):
        validate(cfg.replace(aux5b_epochs=31))   # the longer budget reads every view


def test_a_step_for_one_kind_leaves_the_other_as_it_was(trained, tiny_cfg, tiny_data):
    """The step that trains E1 alone (after Aux+5b's budget ended) returns Aux+5b's
    parameters and BatchNorm statistics untouched."""
    import optax
    from cnneb_jax.model import EXPERT_GROUPS, init_variables, split_collections
    from cnneb_jax.expert_stage import make_expert_step

    model, backbone = load_backbone(trained[0], tiny_cfg)
    variables = init_variables(model, jax.random.PRNGKey(1))
    params, stats = split_collections({g: variables[g] for g in EXPERT_GROUPS})
    tx = optax.sgd(0.5)
    x, y = tiny_data["val_images"][:8], tiny_data["val_labels"][:8]
    new, metrics = make_expert_step(model, tiny_cfg, tx, ("experts",))(
        {"params": params, "stats": stats, "opt": tx.init(params)}, x, y,
        jax.random.PRNGKey(0), jax.numpy.ones((1, 2)), backbone)
    assert leaves_equal(params["aux5b"], new["params"]["aux5b"])
    assert leaves_equal(stats["aux5b"], new["stats"]["aux5b"])
    assert not leaves_equal(params["experts"], new["params"]["experts"])
    assert not leaves_equal(stats["experts"], new["stats"]["experts"])
    assert "acc_aux5b_E1" not in metrics and "acc_experts_E1" in metrics
