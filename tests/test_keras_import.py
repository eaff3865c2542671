"""Keras Inception v3 weights into the `full` config (cnneb_jax/keras_import.py), and the
backbone stage started from them (train.py --init-from)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")

from cnneb_jax.configs import get_config  # noqa: E402
from cnneb_jax.keras_import import (KerasImportError, conv_bn_order,  # noqa: E402
                                    import_keras, random_keras_model)
from cnneb_jax.model import (abstract_variables, branch_fn, build_model,  # noqa: E402
                             init_variables)

SIZE = 75  # the smallest input Keras' Inception v3 takes: keeps the test cheap


def _cfg(**kw):
    fields = {"image_size": str(SIZE), "num_classes": "10", "input_norm": "inception",
              **{k: str(v) for k, v in kw.items()}}
    return get_config("full", fields)


def _zeros(model):
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  abstract_variables(model))


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    """A Keras Inception v3 with random weights, its BatchNorm offsets and statistics
    perturbed so that a wrong mapping of them shows in the logits, saved as .keras."""
    km = random_keras_model(SIZE, classes=10, perturb_bn=True)
    path = tmp_path_factory.mktemp("keras") / "inception_v3.keras"
    km.save(path)
    return path, km


def test_imported_logits_agree_with_keras(keras_file):
    path, km = keras_file
    model = build_model(_cfg())
    variables, report = import_keras(path, model, _zeros(model))
    assert report["conv_layers"] == 94 and report["heads"] == ["O2"]
    assert report["fresh"] == ["O1", "E1"]
    x = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    ref = np.asarray(km(x / 127.5 - 1.0, training=False))
    h, _ = jax.jit(branch_fn(model, 0, "plain"))(variables, x)
    ours = np.asarray(jax.jit(branch_fn(model, 1, "plain"))(variables, h))
    # The perturbed statistics matter: the same weights with fresh statistics differ.
    assert np.abs(ref).max() > 0.1
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_a_classifier_of_another_class_count_is_left_fresh(keras_file):
    model = build_model(_cfg(num_classes=7))
    _, report = import_keras(keras_file[1], model, _zeros(model))
    assert report["heads"] == [] and "O2" in report["fresh"]
    assert "10 classes, the config 7" in report["why_fresh"]


def _small_keras(filters=(32, 32), bn_scale=False):
    x = inp = keras.Input((SIZE, SIZE, 3))
    for i, f in enumerate(filters):
        x = keras.layers.Conv2D(f, 3, strides=2 if i == 0 else 1, use_bias=False)(x)
        x = keras.layers.BatchNormalization(scale=bn_scale)(x)
        x = keras.layers.Activation("relu")(x)
    return keras.Model(inp, x)


def test_a_wrong_model_stops_at_the_first_layer_that_differs():
    model = build_model(_cfg())
    with pytest.raises(KerasImportError, match=r"does not match Conv2d_2a_3x3.*3x3x32x32"):
        import_keras(_small_keras((32, 16)), model, _zeros(model))
    with pytest.raises(KerasImportError, match="2 conv layers, ours 94: nothing matches "
                                               "Conv2d_2b_3x3"):
        import_keras(_small_keras((32, 32)), model, _zeros(model))
    with pytest.raises(KerasImportError, match="has a scale"):
        import_keras(_small_keras((32, 32), bn_scale=True), model, _zeros(model))


def test_a_config_or_file_that_cannot_hold_keras_weights_is_refused(tmp_path):
    model = build_model(get_config("tiny"))
    with pytest.raises(KerasImportError, match="padding='SAME'.*start from the `full`"):
        import_keras(_small_keras(), model, {})
    bad = tmp_path / "broken.keras"
    bad.write_text("not a model")
    full = build_model(_cfg())
    with pytest.raises(KerasImportError, match="broken.keras could not be read"):
        import_keras(bad, full, _zeros(full))
    with pytest.raises(KerasImportError, match="not a file"):
        import_keras(tmp_path / "missing.h5", full, _zeros(full))


def test_conv_order_is_the_order_they_run():
    order = conv_bn_order(build_model(_cfg()))
    assert len(order) == 94
    assert order[0] == ("stem->Mixed_5b", ("Conv2d_1a_3x3",))
    assert order[5] == ("stem->Mixed_5b", ("Mixed_5b", "Branch_0_Conv2d_0a_1x1"))
    assert order[-1] == ("Mixed_5b->end", ("Mixed_7c", "Branch_3_Conv2d_0b_1x1"))


def test_backbone_stage_from_keras_trains_the_new_heads_only(keras_file, tiny_data, tmp_path):
    """Two steps of the transfer path (train.py --init-from) on the tiny folder: the
    imported trunk and its statistics stay bit-identical (no weight decay, no momentum, no
    BatchNorm update), the new heads learn, and a resumed run must give the same file."""
    from cnneb_jax.workdir import TrainingError, load_backbone
    from cnneb_jax.backbone_stage import train_backbone
    path, km = keras_file
    cfg = _cfg(num_classes=7, max_train_examples=16, batch_size=8, epochs=1, ema_decay=0,
               eval_every_epochs=0, checkpoint_every_steps=100, max_test_examples=8)
    data = {**tiny_data, "test_images": tiny_data["test_images"][:8],
            "test_labels": tiny_data["test_labels"][:8]}
    # Tiny's images are 32x32: the config resizes nothing, so give them at 75x75.
    for split in ("train", "val", "calib", "test"):
        imgs = np.asarray(data[f"{split}_images"])
        data[f"{split}_images"] = np.asarray(jax.image.resize(
            imgs, (len(imgs), SIZE, SIZE, 3), "linear")).astype(np.uint8)
    work = tmp_path / "transfer"   # 7 classes, Keras' 10: O2 is new and trains too
    result = train_backbone(cfg, data, work, init_from=path)
    assert result["init_from"]["frozen"] == ["segments"]
    record = json.loads((work / "backbone" / "init_from.json").read_text())
    assert record["path"] == str(path.resolve()) and len(record["sha256"]) == 64
    _, trained = load_backbone(work, cfg)
    model = build_model(cfg)
    imported, _ = import_keras(km, model, _zeros(model))
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)),
                                  trained["segments"], imported["segments"])
    assert all(jax.tree_util.tree_leaves(same))
    # The new heads learned: away from the numbers they started at (and O1's statistics).
    start = init_variables(model, jax.random.PRNGKey(cfg.seed), init_segments=False)
    for head in ("O1", "O2"):
        assert not np.array_equal(trained["heads"][head]["params"]["Logits"]["kernel"],
                                  start["heads"][head]["params"]["Logits"]["kernel"])
    o1_var = lambda v: jax.tree_util.tree_leaves(v["heads"]["O1"]["batch_stats"])[-1]
    assert not np.array_equal(o1_var(trained), o1_var(start))
    other = tmp_path / "other.keras"
    other.write_bytes(path.read_bytes() + b"\0")
    (work / "backbone" / "result.json").unlink()   # as if interrupted: resumable
    with pytest.raises(TrainingError, match="started from .*--retrain"):
        train_backbone(cfg, data, work, init_from=other)


def test_finetune_decides_what_stays_frozen(keras_file, tmp_path):
    """finetune=heads freezes the trunk, and O2 too when the imported classifier fits the
    class count; finetune=all freezes nothing."""
    from cnneb_jax.backbone_stage import imported_start
    path, _ = keras_file
    for n, finetune, frozen in ((10, "heads", ("segments", "heads/O2")),
                                (7, "heads", ("segments",)), (10, "all", ())):
        model = build_model(_cfg(num_classes=n, finetune=finetune))
        _, got, record = imported_start(model.cfg, model, _zeros(model),
                                        tmp_path / f"{n}-{finetune}", path)
        assert got == frozen and record["frozen"] == list(frozen)


def test_a_legacy_h5_file_imports_the_same(keras_file, tmp_path):
    path, km = keras_file
    h5 = tmp_path / "inception_v3.h5"
    km.save(h5)
    model = build_model(_cfg())
    from_keras, _ = import_keras(path, model, _zeros(model))
    from_h5, report = import_keras(h5, model, _zeros(model))
    assert report["conv_layers"] == 94 and report["heads"] == ["O2"]
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), from_keras, from_h5)
    assert all(jax.tree_util.tree_leaves(same))
