"""The backbone stage on a handful of real images: end to end, determinism, EMA, whitening,
progressive resizing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnneb_jax.backbone_stage import train_backbone
from cnneb_jax.workdir import TrainingError, load_backbone, load_trained

from conftest import leaves_equal


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
    # On the expert stage's held-out images only: the calibration split is never read.
    assert gap["images"] == tiny_cfg.val_size - tiny_cfg.calib_size
    assert ("warning" in report) == (gap["difference"] <= gap["standard_error"])


def test_class_balance_weights_give_every_class_the_same_total():
    from cnneb_jax.backbone_stage import class_balance_weights
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
    from tensorboard.util import tensor_util
    assert abs(float(tensor_util.make_ndarray(last.tensor_proto)) - line["heldout_O2"]) < 1e-6


def test_whitened_stem_is_set_from_the_images_and_never_moves(tiny_cfg):
    from cnneb_jax.model import build_model, init_variables, split_collections, whitening_kernel
    from cnneb_jax.optim import backbone_optimizer
    from cnneb_jax.backbone_stage import whiten_stem
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


def test_the_seed_sets_the_start_the_batch_order_and_every_step_key(tiny_cfg, tiny_data,
                                                                    tmp_path):
    """Everything random in the backbone stage follows `seed`, part by part: the starting
    parameters (`_start`, as train_backbone calls it), and in the loop both stages share
    the order of the batches and the key each step gets (for augmentation and dropout).
    Seeds 0 and 1 differ in each; the same seed gives the same again (the end-to-end
    reruns in test_loop.py and test_train_cli.py check whole runs bit for bit)."""
    from cnneb_jax.backbone_stage import _start
    from cnneb_jax.loop import StageSpec, run_stage
    from cnneb_jax.model import build_model
    seen = {}
    for run, seed in enumerate((0, 1, 0)):
        cfg = tiny_cfg.replace(seed=seed, checkpoint_every_steps=1000)
        params = _start(cfg, build_model(cfg), tiny_data, tmp_path / f"{run}" / "backbone",
                        None)[0]
        steps = []

        def step(state, images, labels, key):
            steps.append((np.asarray(labels).tolist(), np.asarray(key).tolist()))
            return state, {"loss": np.float32(0.0)}

        run_stage(StageSpec("probe", tiny_data["train_images"], tiny_data["train_labels"],
                            tiny_cfg.batch_size, 2, ((0, step),)),
                  tmp_path / f"{run}", cfg, {"x": np.zeros(1, np.float32)})
        seen[run] = params, [labels for labels, _ in steps], [key for _, key in steps]
    (p0, order0, keys0), (p1, order1, keys1), (again, order_again, keys_again) = (
        seen[0], seen[1], seen[2])
    assert not leaves_equal(p0, p1) and leaves_equal(p0, again)
    assert len(order0) == 2 * len(tiny_data["train_labels"]) // tiny_cfg.batch_size
    assert order0 != order1 and order0 == order_again
    assert all(k0 != k1 for k0, k1 in zip(keys0, keys1)) and keys0 == keys_again
    assert len({tuple(k) for k in keys0}) == len(keys0)   # a new key at every step


def test_three_exits_train_both_stages(tiny_variants_run):
    # Few epochs: this checks that three exits train end to end, not what they learn.
    _, b, e, _ = tiny_variants_run
    assert set(b["test_accuracy"]) == {"O1", "O2", "O3"}
    assert {"experts_E1", "experts_E2", "aux5b_E2"} <= set(e["test_auc_other_vs_ft"])


def test_the_cascade_is_deterministic_at_every_threshold_of_every_rule(trained, tiny_data):
    """Determinism on the CPU, the part after training: two cascades built from the same
    workdir (each loaded on its own) give the same logits and exits at every threshold of
    every rule. That a second run with the same seed ends with the same bits in every
    parameter is checked across processes, through the CLI killed and rerun
    (test_train_cli.py), and in-process by the resume tests (test_loop.py)."""
    from cnneb_jax.controller import RULES, all_outputs, run_cascade
    from cnneb_jax.programs import make_cascade
    from cnneb_jax.sweep import branch_scores, threshold_grid

    (ma, a), (mb, b) = load_trained(trained[0]), load_trained(trained[0])
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


def test_ema_keeps_a_running_average_and_is_what_gets_evaluated(tiny_variants_run):
    """With `ema_decay`, the checkpoint holds an EMA of the weights and BatchNorm statistics
    beside the live ones, and the finished backbone loads (and is evaluated) as the EMA."""
    from cnneb_jax import checkpoints as ckpt
    from cnneb_jax.model import BACKBONE_GROUPS, init_variables, split_collections
    from cnneb_jax.optim import backbone_optimizer, init_ema
    from cnneb_jax.workdir import subset

    workdir, _, _, _ = tiny_variants_run
    cfg = ckpt.load_config(workdir)
    assert cfg.ema_decay == 0.9
    model, loaded = load_backbone(workdir, cfg)
    params, stats = split_collections(subset(init_variables(model, jax.random.PRNGKey(0)),
                                              BACKBONE_GROUPS))
    like = {"params": params, "stats": stats, "ema": init_ema(params, stats),
            "opt": jax.eval_shape(backbone_optimizer(cfg, 10).init, params)}
    mngr = ckpt.manager(workdir / "backbone")
    st = ckpt.restore_latest(mngr, like)[1]
    mngr.close()
    assert float(st["ema"]["count"]) == cfg.epochs * 6  # one update per step
    assert not leaves_equal(st["ema"]["params"], st["params"])
    assert leaves_equal(loaded["segments"]["stem->Mixed_5b"]["params"],
                         st["ema"]["params"]["segments"]["stem->Mixed_5b"])


def test_progressive_resizing_trains_first_at_the_low_size(tiny_variants_run):
    """With lowres_size/lowres_epochs the first epochs' steps see downscaled images and the
    rest full-size ones; evaluation stays at image_size."""
    _, b, _, train_sizes = tiny_variants_run
    assert train_sizes == [24, 32]     # one trace of each train step, low size first
    assert set(b["test_accuracy"]) == {"O1", "O2", "O3"}


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
