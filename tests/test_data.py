import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnneb_jax.configs import get_config
from cnneb_jax.data import (DataError, augment, epoch_batches, load_dataset, load_image_folder,
                            split_dataset)


def test_image_folder_is_read_and_cached(image_folder, tmp_path):
    raw = load_image_folder(image_folder, tmp_path)
    assert raw["train_images"].shape == (80, 32, 32, 3) and raw["train_images"].dtype == np.uint8
    assert raw["test_images"].shape == (20, 32, 32, 3)
    assert list(raw["class_names"])[:2] == ["airplane", "automobile"]
    assert sorted(np.bincount(raw["train_labels"])) == [8] * 10
    cached = list(tmp_path.glob("*.npz"))
    assert len(cached) == 1
    again = load_image_folder(image_folder, tmp_path)  # from the cache now
    np.testing.assert_array_equal(again["train_images"], raw["train_images"])


def test_splits_are_disjoint_and_fixed(tiny_data, tiny_cfg):
    d = tiny_data
    assert len(d["val_images"]) == tiny_cfg.val_size - tiny_cfg.calib_size
    assert len(d["calib_images"]) == tiny_cfg.calib_size
    flat = lambda a: {x.tobytes() for x in a}
    assert not flat(d["train_images"]) & flat(d["val_images"])
    assert not flat(d["val_images"]) & flat(d["calib_images"])


def test_tfds_path_with_mock_data(tiny_cfg):
    import tensorflow_datasets as tfds
    from cnneb_jax.data import load_tfds
    with tfds.testing.mock_data(num_examples=40):
        raw = load_tfds("cifar10")
    assert raw["train_images"].shape[1:] == (32, 32, 3)
    d = split_dataset(tiny_cfg.replace(val_size=10, calib_size=4), raw)
    assert len(d["train_images"]) == 30 and len(d["calib_images"]) == 4


def test_missing_and_wrong_folders(tmp_path, tiny_cfg):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tiny_cfg, str(tmp_path / "nope"), tmp_path)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no 'test/' folder"):
        load_image_folder(tmp_path, tmp_path / "cache")


def test_class_count_and_size_mismatch(image_folder, tmp_path):
    with pytest.raises(DataError, match="expects 100"):
        load_dataset(get_config("tiny", {"num_classes": "100"}), str(image_folder), tmp_path)
    with pytest.raises(DataError, match="expects 64x64"):
        load_dataset(get_config("tiny", {"image_size": "64"}), str(image_folder), tmp_path)


def test_augment_crops_and_flips():
    imgs = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 8, 1) + 1
    out = augment(jax.random.PRNGKey(0), imgs, pad=2)
    assert out.shape == imgs.shape
    # Every output row is a shifted / mirrored piece of the input or zero padding.
    assert set(np.unique(out).tolist()) <= set(np.unique(imgs).tolist()) | {0.0}
    assert not jnp.array_equal(augment(jax.random.PRNGKey(1), imgs, 2), out)
    flipped_only = augment(jax.random.PRNGKey(3), imgs, pad=0)
    for a, b in zip(flipped_only, imgs):
        assert jnp.array_equal(a, b) or jnp.array_equal(a, b[:, ::-1])


def test_epoch_batches():
    b = epoch_batches(np.random.default_rng(0), 10, 3)
    assert b.shape == (3, 3) and len(set(b.ravel())) == 9
    with pytest.raises(DataError, match="fewer than one batch"):
        epoch_batches(np.random.default_rng(0), 2, 3)
