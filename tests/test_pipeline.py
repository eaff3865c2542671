import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from cnneb_jax import data as data_lib

from cnneb_jax import splits
from cnneb_jax import distributed as dist
from cnneb_jax import pipeline
from cnneb_jax.configs import get_config
from cnneb_jax.data import DataError, load_dataset
from cnneb_jax.pipeline import epoch_batches


def _mixed_folder(root: Path, classes=("a", "b", "c"), n_train=6, n_test=2, seed=0) -> Path:
    """Images of mixed sizes and modes (RGB, grayscale, PNG) in the image-folder layout."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = rng.integers(24, 80, 2)
                arr = rng.integers(0, 255, (h, w, 3), np.uint8)
                im = Image.fromarray(arr)
                if i % 3 == 1:
                    im.convert("L").save(d / f"{i:03d}.jpg")
                elif i % 3 == 2:
                    im.save(d / f"{i:03d}.png")
                else:
                    im.save(d / f"{i:03d}.jpg")
    return root


def _split(folder, split="train", size=32, resize="none"):
    files = data_lib.load_folder_files(folder)
    return files[f"{split}_images"].with_size(size, resize), files[f"{split}_labels"]


def test_listing_keeps_tfds_image_folder_order(image_folder):
    import tensorflow_datasets as tfds
    builder = tfds.folder_dataset.ImageFolder(str(image_folder))
    ds = builder.as_dataset(split="train", shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    theirs = [(Path(e["image/filename"].decode()).name, Path(e["image/filename"].decode()).parent.name,
               int(e["label"])) for e in tfds.as_numpy(ds)]
    classes = data_lib.check_folder_layout(image_folder)
    paths, labels = data_lib.list_class_folder(image_folder / "train", classes, "train")
    mine = [(Path(p).name, Path(p).parent.name, int(y)) for p, y in zip(paths, labels)]
    assert mine == theirs


def test_stream_decodes_the_same_pixels_as_memory(image_folder, decode_cache):
    raw = data_lib.load_image_folder(image_folder, decode_cache)
    split, labels = _split(image_folder)
    rows = epoch_batches(np.random.default_rng(3), len(split), 8)
    got = list(pipeline.batches(split, labels, rows, train=True))
    assert len(got) == len(rows)
    for row, (x, y) in zip(rows, got):
        np.testing.assert_array_equal(x, raw["train_images"][row])
        np.testing.assert_array_equal(y, raw["train_labels"][row])


def test_stream_resumes_mid_epoch_with_the_same_batches(tmp_path):
    folder = _mixed_folder(tmp_path / "mixed")
    split, labels = _split(folder, resize="random_resized_crop")
    rows = epoch_batches(np.random.default_rng(0), len(split), 4)
    full = [x for x, _ in pipeline.batches(split, labels, rows, train=True, seed=1, epoch=2)]
    tail = [x for x, _ in pipeline.batches(split, labels, rows[2:], train=True, seed=1, epoch=2)]
    for a, b in zip(full[2:], tail):
        np.testing.assert_array_equal(a, b)
    other = [x for x, _ in pipeline.batches(split, labels, rows, train=True, seed=1, epoch=3)]
    assert not np.array_equal(full[0], other[0])  # a new crop every epoch
    assert full[0].shape == (4, 32, 32, 3) and full[0].dtype == np.uint8


def test_corrupt_file_is_skipped_and_counted(tmp_path, capsys):
    folder = _mixed_folder(tmp_path / "mixed")
    (folder / "train" / "a" / "zz_bad.jpg").write_bytes(b"not an image")
    split, labels = _split(folder, resize="resize_crop")
    bad = int(np.flatnonzero([p.endswith("zz_bad.jpg") for p in split.paths])[0])
    rows = np.array([[bad, 0, 1, 2]])
    (x, y), = pipeline.batches(split, labels, rows, train=True)
    assert x.shape == (4, 32, 32, 3)
    assert "skipped 1 unreadable image file(s) (zz_bad.jpg)" in capsys.readouterr().err
    # in evaluation the row stays, blank, so outputs line up with the split
    (x, _), = pipeline.batches(split, labels, np.array([[bad, 0, 1, 2]]), train=False)
    assert x[0].max() == 0 and x[1].max() > 0


def test_mixed_sizes_refused_without_resize_and_resized_with_it(tmp_path):
    folder = _mixed_folder(tmp_path / "mixed")
    split, labels = _split(folder)
    with pytest.raises(DataError, match="is not 32x32.*resize=resize_crop"):
        list(pipeline.batches(split, labels, np.arange(4)[None], train=False))
    cfg = get_config("tiny", {"num_classes": "0", "val_size": "6", "calib_size": "2"})
    with pytest.raises(DataError, match="differ in size.*resize=resize_crop"):
        load_dataset(cfg.replace(pipeline="memory"), str(folder), tmp_path / "cache")
    mem = load_dataset(cfg.replace(pipeline="memory", resize="resize_crop"), str(folder),
                       tmp_path / "cache")
    st = load_dataset(cfg.replace(pipeline="stream", resize="resize_crop"), str(folder))
    assert isinstance(st["test_images"], pipeline.FileSplit)
    streamed = pipeline.materialize(st["test_images"])
    assert mem["test_images"].shape == streamed.shape == (6, 32, 32, 3)
    # Pillow and TensorFlow resize with slightly different rounding: within one level
    assert np.abs(mem["test_images"].astype(int) - streamed).max() <= 2


def test_each_process_reads_only_its_rows(image_folder, monkeypatch):
    split, labels = _split(image_folder)
    rows = epoch_batches(np.random.default_rng(0), len(split), 8)
    whole = [x for x, _ in pipeline.batches(split, labels, rows, train=True)]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for pid in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        mine = dist.process_rows(8)
        assert mine == slice(4 * pid, 4 * pid + 4)
        local = [x for x, _ in pipeline.batches(split, labels, rows[:, mine], train=True)]
        for a, b in zip(local, whole):
            np.testing.assert_array_equal(a, b[mine])


def test_auto_rule_streams_large_or_cropped_data(monkeypatch):
    cfg = get_config("cifar")
    monkeypatch.setattr(data_lib, "physical_memory", lambda: 4 * 2**30)
    assert not data_lib.use_streaming(cfg, 60_000)           # 184 MB of 32x32 images
    assert data_lib.use_streaming(cfg.replace(image_size=299), 60_000)   # 16 GB
    assert data_lib.use_streaming(cfg.replace(resize="random_resized_crop"), 10)
    assert not data_lib.use_streaming(cfg.replace(image_size=299, pipeline="memory"), 60_000)
    assert data_lib.use_streaming(cfg.replace(pipeline="stream"), 10)


def test_streamed_training_is_bit_identical_to_memory(tiny_run, tiny_cfg, image_folder,
                                                      tmp_path):
    """The tiny config streamed from the files (no decode cache) ends with the same bits as
    the session's tiny run, which trained on the decoded images in memory."""
    from cnneb_jax.workdir import load_backbone
    from cnneb_jax.backbone_stage import train_backbone
    cfg = tiny_cfg.replace(pipeline="stream")
    st = load_dataset(cfg, str(image_folder))
    assert isinstance(st["train_images"], pipeline.FileSplit)
    streamed = train_backbone(cfg, st, tmp_path / "stream")
    a = load_backbone(tiny_run[0], tiny_cfg)[1]
    b = load_backbone(tmp_path / "stream", cfg)[1]
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert streamed["test_accuracy"] == tiny_run[1]["test_accuracy"]


def test_full_config_trains_a_few_steps_streamed_from_mixed_size_files(tmp_path):
    """The faithful 299x299 Inception v3 (`full`), fed through the streaming path with
    random-resized crops from a folder of mixed sizes and modes; classes from the folder."""
    from cnneb_jax.workdir import load_backbone
    from cnneb_jax.backbone_stage import train_backbone
    folder = _mixed_folder(tmp_path / "photos", n_train=4, n_test=1)
    cfg = get_config("full", {"num_classes": "0", "batch_size": "2", "epochs": "1",
                              "val_size": "4", "calib_size": "2", "eval_every_epochs": "0",
                              "eval_batch_size": "4", "max_train_examples": "4"})
    d = load_dataset(cfg, str(folder))
    assert isinstance(d["train_images"], pipeline.FileSplit)   # auto: random crops stream
    cfg = splits.with_classes(cfg, d["class_names"])
    assert cfg.num_classes == 3 and cfg.image_size == 299
    res = train_backbone(cfg, d, tmp_path / "w")
    assert res["steps"] == 2 and set(res["test_accuracy"]) == {"O1", "O2"}
    _, variables = load_backbone(tmp_path / "w", cfg)
    leaves = jax.tree_util.tree_leaves(variables)
    assert all(np.isfinite(np.asarray(a)).all() for a in leaves)
    assert json.loads((tmp_path / "w" / "class_names.json").read_text()) == ["a", "b", "c"]
