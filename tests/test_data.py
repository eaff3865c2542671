import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnneb_jax.configs import get_config
from cnneb_jax.data import DataError, check_folder_layout, load_dataset, load_image_folder
from cnneb_jax.splits import heldout_split, split_dataset, with_classes
from cnneb_jax.augment import alternating_flips, augment
from cnneb_jax.pipeline import epoch_batches


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


def test_augment_without_flip_only_crops():
    imgs = jnp.arange(4 * 8 * 8 * 1, dtype=jnp.float32).reshape(4, 8, 8, 1) + 1
    for k in range(5):
        out = augment(jax.random.PRNGKey(k), imgs, pad=0, flip=False)
        assert jnp.array_equal(out, imgs)


def test_reflect_padding_crops_hold_only_image_pixels():
    imgs = jnp.arange(16 * 8 * 8 * 1, dtype=jnp.float32).reshape(16, 8, 8, 1) + 1
    out = augment(jax.random.PRNGKey(0), imgs, pad=2, flip=False, pad_mode="reflect")
    zeros = augment(jax.random.PRNGKey(0), imgs, pad=2, flip=False)
    assert (out > 0).all() and (zeros == 0).any()
    # Same offsets: where the zero-padded crop shows the image, so does the reflected one;
    # its border rows are the image mirrored (row -1 of a crop at offset 0 is image row 1).
    seen = zeros > 0
    np.testing.assert_array_equal(out[seen], zeros[seen])
    z = np.asarray(zeros)
    top = np.nonzero((z[:, 0] == 0).all(axis=(1, 2)) & (z[:, 1] == 0).all(axis=(1, 2)))[0]
    assert len(top) > 0
    for i in top:   # crops starting 2 rows above the image: rows 2, 1, 0, 1, 2
        np.testing.assert_array_equal(out[i, 0], out[i, 4])


def test_alternating_flips_mirror_each_image_every_other_epoch():
    first = alternating_flips(3, 1000, 0)
    assert 400 < first.sum() < 600
    for e in range(1, 5):
        np.testing.assert_array_equal(alternating_flips(3, 1000, e), first ^ bool(e % 2))
    np.testing.assert_array_equal(alternating_flips(3, 1000, 2), alternating_flips(3, 1000, 0))
    assert not np.array_equal(alternating_flips(4, 1000, 0), first)


def test_epoch_batches():
    b = epoch_batches(np.random.default_rng(0), 10, 3)
    assert b.shape == (3, 3) and len(set(b.ravel())) == 9
    with pytest.raises(DataError, match="fewer than one batch"):
        epoch_batches(np.random.default_rng(0), 2, 3)


def _folder(tmp_path, n=3, classes=("cat", "dog")):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(
                    tmp_path / split / c / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize("breakage, message", [
    ("empty_class", r"class folder .*train/dog has no images"),
    ("loose_images", r"train has no class folders; its 1 images must sit in one subfolder"),
    ("no_classes", r"test has no class folders"),
    ("class_mismatch", r"different class folders: \['bird'\]"),
    ("mixed_sizes", r"images in train/ differ in size: 6 are 32x32 .*; 1 are 40x32 \(e.g. .*big.png\)"),
    ("all_corrupt", r"no readable images in test/"),
])
def test_bad_folders_give_specific_messages(tmp_path, breakage, message):
    from PIL import Image
    root = _folder(tmp_path / "d")
    if breakage == "empty_class":
        for f in (root / "train" / "dog").iterdir():
            f.unlink()
        (root / "train" / "dog" / "notes.txt").write_text("not an image")
    elif breakage == "loose_images":
        import shutil
        shutil.rmtree(root / "train")
        (root / "train").mkdir()
        Image.new("RGB", (32, 32)).save(root / "train" / "x.png")
    elif breakage == "no_classes":
        import shutil
        shutil.rmtree(root / "test")
        (root / "test").mkdir()
    elif breakage == "class_mismatch":
        (root / "test" / "bird").mkdir()
        Image.new("RGB", (32, 32)).save(root / "test" / "bird" / "0.png")
    elif breakage == "mixed_sizes":
        Image.new("RGB", (32, 40)).save(root / "train" / "cat" / "big.png")
    elif breakage == "all_corrupt":
        for f in (root / "test").rglob("*.png"):
            f.write_bytes(b"garbage")
    with pytest.raises(DataError, match=message):
        load_image_folder(root, tmp_path / "cache")


def test_corrupt_files_are_skipped_and_counted_grayscale_converted(tmp_path, capsys):
    from PIL import Image
    root = _folder(tmp_path / "d")
    (root / "train" / "cat" / "bad.png").write_bytes(b"not a png at all")
    good = (root / "train" / "dog" / "0.png").read_bytes()
    (root / "train" / "dog" / "cut.png").write_bytes(good[: len(good) // 2])
    Image.fromarray(np.full((32, 32), 100, np.uint8)).save(root / "test" / "cat" / "gray.png")
    raw = load_image_folder(root, tmp_path / "cache")
    assert raw["train_images"].shape == (6, 32, 32, 3)  # 8 files, 2 unreadable
    assert raw["test_images"].shape == (7, 32, 32, 3)
    err = capsys.readouterr().err
    assert "skipped 2 unreadable image file(s) in train/" in err
    assert "bad.png" in err and "cut.png" in err
    assert "converted 1 non-RGB image(s) in test/ to RGB" in err and "gray.png (L)" in err
    gray = raw["test_images"][raw["test_images"].std(axis=(1, 2, 3)) == 0]
    assert len(gray) == 1 and gray[0, 0, 0, 0] == 100


def test_a_dir_without_the_layout_is_not_sent_to_tfds(tmp_path, tiny_cfg):
    (tmp_path / "photos").mkdir()
    with pytest.raises(DataError, match="no 'train/' folder"):
        load_dataset(tiny_cfg, str(tmp_path / "photos"), tmp_path / "cache")


def test_files_the_reader_skips_are_named_in_a_warning(tmp_path, capsys):
    from PIL import Image
    root = _folder(tmp_path / "d")
    Image.new("RGB", (32, 32)).save(root / "train" / "cat" / "extra.bmp")
    (root / "train" / "dog" / "notes.txt").write_text("x")
    (root / "train" / "dog" / ".DS_Store").write_text("x")  # hidden: not worth a word
    check_folder_layout(root)
    err = capsys.readouterr().err
    assert "warning: ignored 2 file(s) in train/ that are not .jpg, .jpeg, .png" in err
    assert "cat/extra.bmp" in err and "dog/notes.txt" in err and "DS_Store" not in err


def test_class_count_comes_from_the_data(tmp_path):
    root = _folder(tmp_path / "d", n=4, classes=("cat", "dog", "emu"))
    cfg = get_config("tiny", {"num_classes": "0", "val_size": "3", "calib_size": "1"})
    d = load_dataset(cfg, str(root), tmp_path / "cache")
    assert list(d["class_names"]) == ["cat", "dog", "emu"]
    assert with_classes(cfg, d["class_names"]).num_classes == 3
    assert get_config("cifar").num_classes == 0      # the default takes it from the data
    with pytest.raises(DataError, match="the data has 3 classes but config 'tiny' expects 10"):
        load_dataset(cfg.replace(num_classes=10), str(root), tmp_path / "cache")


def test_group_split_keeps_each_group_on_one_side():
    # 30 "videos" of 10 frames each: frame files named like video07_frame3.jpg
    files = np.array([f"video{v:02d}_frame{f}.jpg" for v in range(30) for f in range(10)])
    rest, val, calib = heldout_split(len(files), 60, 20, files, r"video(\d+)_")
    assert len(set(rest) | set(val) | set(calib)) == len(files)
    assert len(calib) >= 20 and len(val) + len(calib) >= 60
    group = lambda idx: {f.split("_")[0] for f in files[idx]}
    assert not group(rest) & group(val) and not group(rest) & group(calib)
    assert not group(val) & group(calib)
    # a random split puts frames of most videos on both sides
    r, v, c = heldout_split(len(files), 60, 20)
    assert len(group(r) & (group(v) | group(c))) > 20
    with pytest.raises(DataError, match="matches no part of 300 file"):
        heldout_split(len(files), 60, 20, files, r"clip(\d+)")
    with pytest.raises(DataError, match="needs an image folder"):
        heldout_split(len(files), 60, 20, None, r"video(\d+)_")


def test_group_pattern_is_checked_when_the_config_is_built():
    with pytest.raises(ValueError, match="group_pattern is not a regular expression"):
        get_config("tiny", {"group_pattern": "video(\\d+"})


def test_val_dir_supplies_the_held_out_images(tmp_path):
    root = _folder(tmp_path / "d", n=5)
    val = _folder(tmp_path / "v", n=4)
    import shutil
    shutil.rmtree(val / "test")
    cfg = get_config("tiny", {"calib_size": "3"})
    d = load_dataset(cfg.replace(num_classes=2), str(root), tmp_path / "cache", str(val / "train"))
    assert len(d["train_images"]) == 10          # all of train/
    assert len(d["val_images"]) == 5 and len(d["calib_images"]) == 3
    with pytest.raises(DataError, match="val dir .* has class folders the training data lacks"):
        (val / "train" / "owl").mkdir()
        load_dataset(cfg.replace(num_classes=2), str(root), tmp_path / "cache", str(val / "train"))


def test_an_image_replaced_in_place_is_decoded_again(tmp_path):
    """The cache key covers each file's size and modification time: a picture replaced
    under the same name (same count, same folder) is never read back stale."""
    import os
    from PIL import Image
    root = _folder(tmp_path / "f")
    first = load_image_folder(root, tmp_path / "cache")
    target = root / "train" / "cat" / "0.png"
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(target)
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse clocks
    again = load_image_folder(root, tmp_path / "cache")
    changed = [i for i in range(len(again["train_images"]))
               if not np.array_equal(again["train_images"][i], first["train_images"][i])]
    assert len(changed) == 1 and (again["train_images"][changed[0]] == 7).all()
    # The identity a workdir records follows the content too (the size changed here).
    assert again["identity"] != first["identity"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_decode_cache_is_rebuilt_with_one_warning(tmp_path, capsys, damage):
    root = _folder(tmp_path / "f")
    first = load_image_folder(root, tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("*.npz")
    blob = cache.read_bytes()
    cache.write_bytes(blob[:len(blob) // 2] if damage == "truncate" else b"x" * 100)
    again = load_image_folder(root, tmp_path / "cache")
    np.testing.assert_array_equal(again["train_images"], first["train_images"])
    err = capsys.readouterr().err
    assert err.count("is damaged") == 1 and cache.name in err
    load_image_folder(root, tmp_path / "cache")   # rebuilt: read without a warning now
    assert "damaged" not in capsys.readouterr().err


def test_a_data_or_cache_folder_that_is_a_file_is_named(tmp_path, tiny_cfg):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="data dir .*data.txt is a file, not a folder"):
        load_dataset(tiny_cfg, str(tmp_path / "data.txt"), tmp_path)
    root = _folder(tmp_path / "f")
    with pytest.raises(DataError, match="cache folder .*data.txt is a file, not a folder"):
        load_dataset(tiny_cfg, str(root), tmp_path / "data.txt")
