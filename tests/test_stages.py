"""One short end-to-end run per stage on a handful of real images, with resume and freezing."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnneb_jax.stages import (TrainingError, load_backbone, load_trained, train_backbone,
                              train_expert)

from conftest import copy_workdir


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def trained(tiny_run):
    return tiny_run


def test_backbone_stage_end_to_end(trained, tiny_cfg):
    workdir, b, _ = trained
    assert set(b["test_accuracy"]) == {"O1", "O2"}
    assert all(0.0 <= v <= 1.0 for v in b["test_accuracy"].values())
    assert (workdir / "backbone" / "result.json").exists()
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any(l.get("stage") == "backbone" and "loss" in l for l in lines)
    # One held-out evaluation per epoch (settings are chosen on it, never on test).
    epochs = [l for l in lines if l.get("stage") == "backbone" and l.get("event") == "epoch"]
    assert [l["epoch"] for l in epochs] == list(range(1, tiny_cfg.epochs + 1))
    assert all(0.0 <= l["heldout_O2"] <= 1.0 for l in epochs)
    assert json.loads((workdir / "class_names.json").read_text())[:2] == ["airplane", "automobile"]
    # The self-report on the held-out images: each exit's classes, and O2 against O1 (with
    # the warning exactly when O2 is not better by more than its standard error).
    report = b["heldout_report"]
    assert set(report["classes"]) == {"O1", "O2"} and len(report["classes"]["O2"]["worst"]) == 5
    gap = report["exit_gap"]
    assert gap["images"] == tiny_cfg.val_size
    assert ("warning" in report) == (gap["difference"] <= gap["standard_error"])


def test_class_balance_weights_give_every_class_the_same_total():
    from cnneb_jax.stages import class_balance_weights
    labels = np.array([0] * 8 + [1] * 2 + [3] * 2)
    w = class_balance_weights(labels, 4)
    np.testing.assert_allclose(w, [0.5, 2.0, 0.0, 2.0])
    totals = np.bincount(labels, weights=w[labels], minlength=4)
    np.testing.assert_allclose(totals[[0, 1, 3]], totals[0])


def test_metrics_are_also_tensorboard_events(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(trained[0] / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {"backbone/loss", "backbone/epoch/heldout_O2", "expert/loss",
            "backbone/test/test_accuracy/O2"} <= tags
    last = acc.Tensors("backbone/epoch/heldout_O2")[-1]
    line = [json.loads(l) for l in (trained[0] / "metrics.jsonl").read_text().splitlines()
            if '"event": "epoch"' in l and '"backbone"' in l][-1]
    assert abs(float(jax.numpy.asarray(__import__("tensorflow").make_ndarray(last.tensor_proto)))
               - line["heldout_O2"]) < 1e-6


def test_expert_stage_end_to_end(trained, tiny_cfg):
    workdir, _, e = trained
    assert {"experts_E1", "aux5b_E1", "max_softmax_O1"} <= set(e["test_auc_other_vs_ft"])
    assert len(e["heldout_ft_examples"]) == 1 and e["heldout_ft_examples"][0] >= 0
    model, full = load_trained(workdir)
    assert set(full) == {"segments", "heads", "experts", "aux5b"}


def test_expert_stage_warns_of_few_or_leaked_ft_examples(capsys):
    from cnneb_jax.stages import _warn_leak
    _warn_leak([0.005], [0.023], 10_000)   # the leak seen on a split of video frames
    assert "held-out images look leaked" in capsys.readouterr().err
    _warn_leak([0.02], [0.023], 10_000)
    _warn_leak([0.0], [0.02], 100)         # too few test FT examples to tell
    assert capsys.readouterr().err == ""


def test_expert_step_updates_only_the_experts(trained, tiny_cfg, tiny_data):
    """One expert step at a real learning rate: every expert kind moves, while O1 and O2
    (and the backbone's BatchNorm statistics) give bit-identical outputs afterwards."""
    import optax
    from cnneb_jax.model import (EXPERT_GROUPS, init_variables, merge_collections,
                                 split_collections)
    from cnneb_jax.stages import make_expert_step, make_predict_fn

    model, backbone = load_backbone(trained[0], tiny_cfg)
    variables = init_variables(model, jax.random.PRNGKey(1))
    params, stats = split_collections({g: variables[g] for g in EXPERT_GROUPS})
    tx = optax.sgd(0.5)
    step = make_expert_step(model, tiny_cfg, tx, backbone)
    x, y = tiny_data["val_images"][:8], tiny_data["val_labels"][:8]
    class_w = jax.numpy.ones((1, 2))
    new, _ = step({"params": params, "stats": stats, "opt": tx.init(params)}, x, y,
                  jax.random.PRNGKey(0), class_w)
    # Only expert parameters and expert BatchNorm statistics come out of the step.
    assert set(new["params"]) == set(new["stats"]) == set(EXPERT_GROUPS)
    for g in EXPERT_GROUPS:
        assert not _leaves_equal(params[g], new["params"][g]), f"{g} did not move"
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
    from cnneb_jax.data import augment
    from cnneb_jax.heads import OTHER
    from cnneb_jax.metrics import ft_labels, roc_auc
    from cnneb_jax.stages import balanced_expert_loss, class_weights, make_predict_fn

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


def test_finished_stage_is_not_retrained(trained, tiny_cfg, tiny_data, capsys):
    workdir, b, _ = trained
    again = train_backbone(tiny_cfg, tiny_data, workdir)
    assert again == b
    assert "already trained" in capsys.readouterr().out


def test_resume_after_interruption_gives_identical_parameters(trained, tiny_cfg, tiny_data,
                                                              tmp_path):
    """A run that lost its last checkpoint and its result (as after a crash) resumes from
    the previous checkpoint and ends bit-identical to the uninterrupted session run."""
    full_dir = trained[0]
    cut_dir = copy_workdir(full_dir, tmp_path / "cut")
    steps = sorted(int(p.name) for p in (cut_dir / "backbone" / "ckpt").iterdir()
                   if p.name.isdigit())
    assert len(steps) >= 2
    shutil.rmtree(cut_dir / "backbone" / "ckpt" / str(steps[-1]))
    (cut_dir / "backbone" / "result.json").unlink()
    train_backbone(tiny_cfg, tiny_data, cut_dir)
    log = [json.loads(l) for l in (cut_dir / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "test" and log[-2]["step"] == steps[-1]  # really retrained
    _, a = load_backbone(full_dir, tiny_cfg)
    _, b = load_backbone(cut_dir, tiny_cfg)
    assert _leaves_equal(a, b)


def test_ctrl_c_saves_the_steps_done_and_resumes_bit_identical(trained, tiny_cfg, tiny_data,
                                                               tmp_path, monkeypatch):
    """Ctrl-C in the middle of the loop keeps every finished step (a checkpoint between the
    regular ones), says how to resume, and the resumed run equals the uninterrupted one."""
    from cnneb_jax import stages
    real = stages.make_backbone_step
    calls = []

    def interrupting(*args, **kw):
        step = real(*args, **kw)

        def wrapped(*a):
            calls.append(1)
            if len(calls) == 5:
                raise KeyboardInterrupt
            return step(*a)
        return wrapped

    monkeypatch.setattr(stages, "make_backbone_step", interrupting)
    with pytest.raises(stages.TrainingInterrupted, match="step 4/.*run the same command again"):
        train_backbone(tiny_cfg, tiny_data, tmp_path)
    assert (tmp_path / "backbone" / "ckpt" / "4").is_dir()  # not a multiple of 8: saved on Ctrl-C
    monkeypatch.setattr(stages, "make_backbone_step", real)
    train_backbone(tiny_cfg, tiny_data, tmp_path)
    _, a = load_backbone(trained[0], tiny_cfg)
    _, b = load_backbone(tmp_path, tiny_cfg)
    assert _leaves_equal(a, b)


def test_whitened_stem_is_set_from_the_images_and_never_moves(tiny_cfg):
    from cnneb_jax.model import build_model, init_variables, split_collections, whitening_kernel
    from cnneb_jax.stages import backbone_optimizer, whiten_stem
    cfg = tiny_cfg.replace(whiten_stem=True, stem_channels=12, warmup_epochs=0.0, epochs=1)
    v = init_variables(build_model(cfg), jax.random.PRNGKey(0))
    params, _ = split_collections({"segments": v["segments"], "heads": v["heads"]})
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3)).astype(np.uint8)
    params = whiten_stem(cfg, params, images)
    stem = lambda p: p["segments"]["stem->Mixed_5b"]["Conv2d_1a_3x3"]["conv"]["kernel"]
    np.testing.assert_array_equal(stem(params), whitening_kernel(images, 12))
    tx = backbone_optimizer(cfg, 100)
    grads = jax.tree_util.tree_map(jax.numpy.ones_like, params)
    _, state = tx.update(grads, tx.init(params), params)  # step 0: warm-up lr is 0
    updates, _ = tx.update(grads, state, params)
    assert float(jax.numpy.abs(stem(updates)).max()) == 0.0
    second = updates["segments"]["stem->Mixed_5b"]["Conv2d_2a_3x3"]["conv"]["kernel"]
    assert float(jax.numpy.abs(second).max()) > 0.0


def test_expert_needs_a_backbone(tiny_cfg, tiny_data, tmp_path):
    with pytest.raises(TrainingError, match="no finished backbone"):
        train_expert(tiny_cfg, tiny_data, tmp_path)


def test_experts_train_on_the_backbone_of_another_workdir(trained, tiny_cfg, tiny_data,
                                                           tiny_ablation, tmp_path):
    from cnneb_jax.stages import backbone_source
    assert backbone_source(tiny_ablation) == trained[0].resolve()
    assert not (tiny_ablation / "backbone").exists()  # nothing of its own
    _, own = load_trained(trained[0])
    _, linked = load_trained(tiny_ablation)
    assert _leaves_equal({g: own[g] for g in ("segments", "heads")},
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
    assert _leaves_equal(again, linked)
    # A linked workdir trains no backbone; a backbone field that differs is refused.
    with pytest.raises(TrainingError, match="takes its backbone from"):
        train_backbone(tiny_cfg.replace(expert_inputs="paper"), tiny_data, tiny_ablation)
    with pytest.raises(TrainingError, match="width"):
        train_expert(tiny_cfg.replace(width=0.125), tiny_data, tmp_path / "w",
                     backbone_from=trained[0])
    assert not (tmp_path / "w").exists()   # a refused link leaves nothing behind
    with pytest.raises(TrainingError, match="own"):
        train_expert(tiny_cfg, tiny_data, trained[0], backbone_from=tiny_ablation)


def test_different_seeds_differ(trained, tiny_cfg, tiny_data, tmp_path):
    cfg2 = tiny_cfg.replace(seed=1)
    train_backbone(cfg2, tiny_data, tmp_path / "b")
    _, a = load_backbone(trained[0], tiny_cfg)
    _, b = load_backbone(tmp_path / "b", cfg2)
    assert not _leaves_equal(a, b)


def test_two_exit_config_trains_both_stages(tiny_cfg, tiny_data, tmp_path):
    cfg = tiny_cfg.replace(branch_points=("Mixed_5b", "Mixed_6e"))
    b = train_backbone(cfg, tiny_data, tmp_path)
    e = train_expert(cfg, tiny_data, tmp_path)
    assert set(b["test_accuracy"]) == {"O1", "O2", "O3"}
    assert {"experts_E1", "experts_E2", "aux5b_E2"} <= set(e["test_auc_other_vs_ft"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_cfg, tmp_path):
    """A step function whose loss turns NaN at step 3 (checkpoints every 2 steps): the run
    stops at the next check, which every save makes (step 4), with a clear message; the
    newest checkpoint is step 2's, finite."""
    import jax.numpy as jnp
    from cnneb_jax import checkpoints as ckpt
    from cnneb_jax.stages import _run_loop

    def step_fn(state, images, labels, rng):
        x = state["x"] + 1.0
        diverged = jnp.isnan(x) | (x >= 3.0)
        loss = jnp.where(diverged, jnp.nan, 0.5)
        return {"x": jnp.where(diverged, jnp.nan, x)}, {"loss": loss}

    cfg = tiny_cfg.replace(checkpoint_every_steps=2)
    images = np.zeros((40, 32, 32, 3), np.uint8)
    with pytest.raises(TrainingError, match="loss became nan at step 4"):
        _run_loop("backbone", tmp_path, cfg, {"x": jnp.zeros(())}, step_fn, images,
                  np.zeros(40, np.int32), 8, 1)
    mngr = ckpt.manager(tmp_path / "backbone")
    step, state, _ = ckpt.restore_latest(mngr, {"x": jnp.zeros(())})
    mngr.close()
    assert step == 2 and float(state["x"]) == 2.0


def test_same_seed_gives_bit_identical_parameters_and_sweep_accuracies(trained, tiny_cfg,
                                                                        tiny_data, tmp_path):
    """Determinism on the CPU: a second run with the same seed, config and data ends with the
    same bits in every parameter, and the real cascade gives the same accuracy at every
    threshold of every rule."""
    from cnneb_jax.controller import RULES, all_outputs, make_cascade, run_cascade
    from cnneb_jax.sweep import branch_scores, threshold_grid

    workdir = trained[0]
    train_backbone(tiny_cfg, tiny_data, tmp_path)
    train_expert(tiny_cfg, tiny_data, tmp_path)
    (ma, a), (mb, b) = load_trained(workdir), load_trained(tmp_path)
    assert _leaves_equal(a, b)
    x, y = tiny_data["test_images"], tiny_data["test_labels"]
    ca, cb = make_cascade(ma, a, 16), make_cascade(mb, b, 16)
    outputs = all_outputs(ca, x)
    for rule in RULES:
        grid = threshold_grid(branch_scores(outputs, rule, y))
        for t in grid[:: max(1, len(grid) // 8)]:
            ra = run_cascade(ca, x, rule, float(t), y)
            rb = run_cascade(cb, x, rule, float(t), y)
            np.testing.assert_array_equal(ra["logits"], rb["logits"])
            np.testing.assert_array_equal(ra["exit"], rb["exit"])


def test_ema_keeps_a_running_average_and_is_what_gets_evaluated(tiny_cfg, tiny_data, tmp_path):
    """With `ema_decay`, the checkpoint holds an EMA of the weights and BatchNorm statistics
    beside the live ones, and the finished backbone loads (and is evaluated) as the EMA."""
    from cnneb_jax import checkpoints as ckpt
    from cnneb_jax.model import BACKBONE_GROUPS, init_variables, split_collections
    from cnneb_jax.stages import (_restore_stage, _subset, backbone_optimizer, init_ema)

    cfg = tiny_cfg.replace(ema_decay=0.9)
    train_backbone(cfg, tiny_data, tmp_path)
    model, loaded = load_backbone(tmp_path, cfg)
    params, stats = split_collections(_subset(init_variables(model, jax.random.PRNGKey(0)),
                                              BACKBONE_GROUPS))
    st = _restore_stage(tmp_path, "backbone", params, stats, backbone_optimizer(cfg, 10),
                        ema=init_ema(params, stats))
    assert float(st["ema"]["count"]) == cfg.epochs * 6  # one update per step
    assert not _leaves_equal(st["ema"]["params"], st["params"])
    assert _leaves_equal(loaded["segments"]["stem->Mixed_5b"]["params"],
                         st["ema"]["params"]["segments"]["stem->Mixed_5b"])
    assert ckpt.load_config(tmp_path).ema_decay == 0.9


def test_update_ema_ramps_its_decay():
    from cnneb_jax.stages import init_ema, update_ema
    ema = init_ema({"w": jax.numpy.zeros(2)}, {"m": jax.numpy.zeros(2)})
    ema = update_ema(ema, {"w": jax.numpy.ones(2)}, {"m": jax.numpy.ones(2)}, 0.99)
    # First step: decay (1 + 0) / (10 + 0) = 0.1, so the average moves 90% of the way.
    np.testing.assert_allclose(ema["params"]["w"], 0.9, rtol=1e-6)
    np.testing.assert_allclose(ema["stats"]["m"], 0.9, rtol=1e-6)
    for _ in range(2000):
        ema = update_ema(ema, {"w": jax.numpy.zeros(2)}, {"m": jax.numpy.zeros(2)}, 0.99)
    assert float(ema["count"]) == 2001 and float(ema["params"]["w"][0]) < 1e-6


def test_lookahead_resets_the_weights_to_the_average_on_its_steps_only():
    from cnneb_jax.stages import init_ema, lookahead
    jnp = jax.numpy
    ema = init_ema({"w": jnp.zeros(2)}, {"m": jnp.zeros(2)})
    step = lambda ema, w: lookahead(ema, {"w": jnp.full(2, w)}, {"m": jnp.full(2, w)},
                                    0.9, every=5, start_step=3, total_steps=10)
    # Before start_step the average is the weights.
    ema, p, s = step(ema, 1.0)
    assert float(ema["params"]["w"][0]) == 1.0 and float(p["w"][0]) == 1.0
    ema, p, s = step(ema, 1.0)
    ema, p, s = step(ema, 1.0)            # step 3: not a multiple of 5, both run free
    ema, p, s = step(ema, 2.0)            # step 4: the weights move, the average stays
    assert float(ema["params"]["w"][0]) == 1.0 and float(p["w"][0]) == 2.0
    ema, p, s = step(ema, 3.0)            # step 5: average 1 -> toward 3, weights reset
    rho = 0.9 ** 5 * (5 / 10) ** 3
    np.testing.assert_allclose(ema["params"]["w"], rho * 1.0 + (1 - rho) * 3.0, rtol=1e-6)
    np.testing.assert_allclose(p["w"], ema["params"]["w"])
    np.testing.assert_allclose(s["m"], ema["stats"]["m"])
    assert float(ema["count"]) == 5


def test_lr_start_and_end_set_the_ends_of_the_triangle():
    from cnneb_jax.stages import make_optimizer
    params = {"w": jax.numpy.zeros(1)}
    grads = {"w": jax.numpy.ones(1)}
    tx = make_optimizer(1.0, 10, 3, 0.0, 0.0, start=0.2, end=0.07)
    state, moves = tx.init(params), []
    for _ in range(10):
        updates, state = tx.update(grads, state, params)
        moves.append(-float(updates["w"][0]))
    # Up from 0.2 over 3 steps, then down toward 0.07, reached at step 10.
    np.testing.assert_allclose([moves[0], moves[3], moves[9]], [0.2, 1.0, 1 - 0.93 * 6 / 7],
                               rtol=1e-6)


def test_bn_bias_lr_mult_scales_only_batchnorm_offsets(tiny_cfg):
    from cnneb_jax.stages import backbone_optimizer
    params = {"seg": {"conv": {"kernel": jax.numpy.ones((3, 3))},
                      "bn": {"bias": jax.numpy.ones(3)}},
              "head": {"Logits": {"bias": jax.numpy.ones(3)}}}
    grads = jax.tree_util.tree_map(jax.numpy.ones_like, params)
    moves = {}
    for mult in (1.0, 8.0):
        cfg = tiny_cfg.replace(bn_bias_lr_mult=mult, weight_decay=0.0, momentum=0.0,
                               warmup_epochs=0.0, epochs=1)
        tx = backbone_optimizer(cfg, 100)
        _, state = tx.update(grads, tx.init(params), params)  # step 0: warm-up lr is 0
        updates, _ = tx.update(grads, state, params)
        moves[mult] = jax.tree_util.tree_map(lambda u: float(jax.numpy.abs(u).max()), updates)
    assert moves[8.0]["seg"]["bn"]["bias"] > 7.9 * moves[1.0]["seg"]["bn"]["bias"] > 0
    assert moves[8.0]["seg"]["conv"]["kernel"] == moves[1.0]["seg"]["conv"]["kernel"]
    assert moves[8.0]["head"]["Logits"]["bias"] == moves[1.0]["head"]["Logits"]["bias"]


def test_alternate_flip_mirrors_the_batches_the_step_sees(tiny_cfg, tmp_path):
    """With flip=alternate the loop hands the step each image mirrored in every other
    epoch (and the step itself no longer flips at random)."""
    from cnneb_jax.data import alternating_flips
    from cnneb_jax.stages import _run_loop
    cfg = tiny_cfg.replace(flip="alternate", checkpoint_every_steps=1000)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 8, 8, 3), np.uint8)
    labels = np.arange(16, dtype=np.int32)
    seen = {}

    def step(state, batch, batch_labels, key):
        for im, y in zip(np.asarray(batch), np.asarray(batch_labels)):
            seen.setdefault(int(y), []).append(im)
        return state, {"loss": np.float32(0.0)}

    _run_loop("probe", tmp_path, cfg, {"x": np.zeros(1, np.float32)}, step, images, labels,
              batch_size=8, epochs=3, mirror=lambda e: alternating_flips(cfg.seed, 16, e))
    first = alternating_flips(cfg.seed, 16, 0)
    for y, views in seen.items():
        assert len(views) == 3
        for epoch, im in enumerate(views):
            mirrored = bool(first[y]) ^ bool(epoch % 2)
            np.testing.assert_array_equal(im, images[y][:, ::-1] if mirrored else images[y])


def test_progressive_resizing_trains_first_at_the_low_size(tiny_cfg, tiny_data, tmp_path,
                                                            monkeypatch):
    """With lowres_size/lowres_epochs the first epochs' steps see downscaled images and the
    rest full-size ones; evaluation stays at image_size."""
    from cnneb_jax import stages
    seen = []
    forward = stages.backbone_forward

    def spy(model, params, stats, x, train, rng=None, frozen=()):
        if train:
            seen.append(x.shape[1])   # once per trace of a train step
        return forward(model, params, stats, x, train, rng, frozen)

    monkeypatch.setattr(stages, "backbone_forward", spy)
    cfg = tiny_cfg.replace(epochs=2, lowres_size=24, lowres_epochs=1.0, eval_every_epochs=0)
    result = train_backbone(cfg, tiny_data, tmp_path)
    assert seen == [24, 32]
    assert set(result["test_accuracy"]) == {"O1", "O2"}


def test_the_network_runs_below_image_size_with_its_trained_o1_kernel(tiny_cfg):
    """At 16x16 the O1 head's pooled map (3x3) is smaller than the 5x5 kernel sized at 32x32:
    the head zero-pads the map and keeps its parameters, so progressive resizing can go that
    low; at image_size nothing changes."""
    from cnneb_jax.model import backbone_forward, build_model, init_variables, split_collections
    model = build_model(tiny_cfg)
    variables = init_variables(model, jax.random.PRNGKey(0))
    assert "Conv2d_2a_5x5" in variables["heads"]["O1"]["params"]["AuxLayers"]
    params, stats = split_collections(variables)
    for size in (16, 20, 32):
        x = jnp.ones((2, size, size, 3), jnp.float32)
        logits, _, _ = backbone_forward(model, params, stats, x, train=False)
        assert [l.shape for l in logits] == [(2, tiny_cfg.num_classes)] * 2
        assert all(bool(jnp.all(jnp.isfinite(l))) for l in logits)


def test_a_low_size_the_network_cannot_take_is_refused_before_training(tiny_cfg, tiny_data,
                                                                        tmp_path):
    # VALID padding (the original Inception v3's) shrinks 16x16 to nothing before Mixed_7a.
    cfg = tiny_cfg.replace(padding="VALID", lowres_size=16, lowres_epochs=1.0)
    with pytest.raises(TrainingError, match="lowres_size=16: the network cannot run on 16x16"):
        train_backbone(cfg, tiny_data, tmp_path)
    assert not (tmp_path / "backbone" / "ckpt").exists() or not any(
        (tmp_path / "backbone" / "ckpt").iterdir())
