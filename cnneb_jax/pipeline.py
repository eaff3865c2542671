"""Batches for training and evaluation, from decoded arrays or streamed from image files.

Small datasets are decoded once into a uint8 array (data.py). Larger ones stay as a
`FileSplit` (paths only) and are read batch by batch through tf.data: parallel read, decode
and resize on the host, a few batches prefetched, each process reading only its own rows
of every global batch. Which path a dataset takes: `data.use_streaming`.

Both paths take the same index batches (`epoch_batches`, which depend only on the seed
and the epoch), so a resumed run reads the same images in the same order. A file that fails
to decode is skipped and counted; its row is filled by another image of the same batch in
training, by a blank image in evaluation (said in the warning).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Iterator

import numpy as np

from cnneb_jax import tfenv


class DataError(ValueError):
    """A problem with the user's data (missing folder, wrong layout, bad images)."""


@dataclasses.dataclass(frozen=True, eq=False)
class FileSplit:
    """A split kept as image file paths; indexes like an (N, size, size, 3) uint8 array."""
    paths: np.ndarray            # object array of str
    image_size: int = 0          # 0 = not set yet (see `with_size`)
    resize: str = "none"         # the config field `resize`

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.image_size, self.image_size, 3)

    def __getitem__(self, idx) -> "FileSplit":
        return dataclasses.replace(self, paths=np.asarray(self.paths[idx], dtype=object))

    def with_size(self, image_size: int, resize: str) -> "FileSplit":
        return dataclasses.replace(self, image_size=image_size, resize=resize)


def _tf():
    tfenv.quiet()
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")  # tf.data stays on the host; JAX owns the GPU
    return tf


def _decode_fn(tf, split: FileSplit, train: bool, seed: int, epoch: int):
    size, mode = split.image_size, split.resize
    paths = tf.constant(split.paths.astype(str))

    def decode(index):
        raw = tf.io.read_file(tf.gather(paths, index))
        # JPEGs with the accurate integer DCT, as Pillow decodes them (TF's default, the fast
        # one, differs by a few levels): both paths then give the same pixels.
        img = tf.cond(tf.io.is_jpeg(raw),
                      lambda: tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE"),
                      lambda: tf.io.decode_image(raw, channels=3, expand_animations=False))
        img.set_shape([None, None, 3])
        hw = tf.shape(img)[:2]
        if mode == "none":
            ok = tf.reduce_all(tf.equal(hw, size))
            img = tf.image.resize_with_crop_or_pad(img, size, size)
        elif mode == "random_resized_crop" and train:
            # Inception-style crop: 25-100% of the area, aspect 3/4-4/3; the seed depends only
            # on (seed, epoch, image), so a resumed epoch crops the same way.
            begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
                tf.shape(img), tf.zeros([1, 0, 4]), seed=tf.stack(
                    [tf.constant(seed * 1_000_003 + epoch, tf.int64), tf.cast(index, tf.int64)]),
                min_object_covered=0.0, aspect_ratio_range=(0.75, 4 / 3),
                area_range=(0.25, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
            img = tf.slice(img, begin, crop)
            img = tf.image.resize(img, [size, size], antialias=True)
            ok = tf.constant(True)
        else:
            # Shorter side to `size` (aspect kept), then a centre crop.
            scale = size / tf.cast(tf.reduce_min(hw), tf.float32)
            new = tf.maximum(size, tf.cast(tf.round(tf.cast(hw, tf.float32) * scale), tf.int32))
            img = tf.image.resize(img, new, antialias=True)
            img = tf.image.resize_with_crop_or_pad(img, size, size)
            ok = tf.constant(True)
        img = tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8) \
            if img.dtype != tf.uint8 else img
        return index, img, ok

    return decode


def stream(split: FileSplit, index_batches: np.ndarray, train: bool, seed: int = 0,
           epoch: int = 0, prefetch: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, uint8 images) per row of `index_batches`, decoded by tf.data in parallel.

    Rows whose files failed to decode are missing from a batch's `indices` (the caller fills
    them); a file of the wrong size under `resize=none` raises DataError.
    """
    if len(index_batches) > 1 and len(index_batches[-1]) != len(index_batches[0]):
        # Evaluation's last batch is shorter: stream it on its own.
        yield from stream(split, index_batches[:-1], train, seed, epoch, prefetch)
        yield from stream(split, index_batches[-1:], train, seed, epoch, prefetch)
        return
    tf = _tf()
    if split.image_size <= 0:
        raise ValueError("FileSplit has no image size: call with_size first")
    decode = _decode_fn(tf, split, train, seed, epoch)
    n_rows = len(index_batches)
    steps = tf.data.Dataset.from_tensor_slices(
        (np.arange(n_rows, dtype=np.int64), np.asarray(index_batches, np.int64)))

    def one_batch(step, row):
        files = tf.data.Dataset.from_tensor_slices(row).map(
            decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        # A file that fails to decode drops out of its own batch only.
        files = files.ignore_errors().batch(tf.size(row, out_type=tf.int64))
        return files.map(lambda i, x, ok: (step, i, x, ok))

    ds = steps.interleave(one_batch, cycle_length=2, block_length=1,
                          num_parallel_calls=2, deterministic=True).prefetch(prefetch)
    def all_failed(step: int) -> DataError:
        return DataError(f"no file of batch {step} could be decoded, e.g. "
                         f"{split.paths[index_batches[step][0]]}")

    expected = 0
    for step, idx, images, ok in ds.as_numpy_iterator():
        if step != expected:
            raise all_failed(expected)
        if not ok.all():
            bad = split.paths[idx[~ok][0]]
            raise DataError(f"{bad} is not {split.image_size}x{split.image_size}; let the "
                            f"config resize images (--set resize=resize_crop)")
        expected += 1
        yield idx, images
    if expected != n_rows:
        raise all_failed(expected)


def _report_skipped(split: FileSplit, missing: np.ndarray, filled: str) -> None:
    names = [os.path.basename(str(p)) for p in split.paths[missing[:5]]]
    print(f"warning: skipped {len(missing)} unreadable image file(s) ({', '.join(names)}"
          f"{' ...' if len(missing) > 5 else ''}); {filled}", file=sys.stderr)


def batches(images, labels: np.ndarray, index_batches: np.ndarray, train: bool,
            seed: int = 0, epoch: int = 0, mirror: np.ndarray | None = None
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images, labels) for each row of `index_batches`, from an array or a FileSplit.

    `mirror` (per image of the split) flips the chosen images horizontally. In training a
    skipped file's row repeats another image of its batch (with its label); in evaluation it
    is blank (label kept), so outputs stay aligned with the split.
    """
    if not isinstance(images, FileSplit):
        for row in index_batches:
            x = images[row]
            if mirror is not None:
                x = np.where(mirror[row][:, None, None, None], x[:, :, ::-1], x)
            yield x, labels[row]
        return
    for row, (idx, x) in zip(index_batches, stream(images, index_batches, train, seed, epoch)):
        if len(idx) < len(row):
            missing = np.setdiff1d(row, idx)
            if train:
                _report_skipped(images, missing, "their rows repeat other images of the batch")
                take = np.resize(np.arange(len(idx)), len(row))
                idx, x = idx[take], x[take]
            else:
                _report_skipped(images, missing, "they are evaluated as blank images")
                full = np.zeros((len(row),) + x.shape[1:], x.dtype)
                full[np.isin(row, idx)] = x  # tf.data keeps the row's order
                x, idx = full, row
        if mirror is not None:
            x = np.where(mirror[idx][:, None, None, None], x[:, :, ::-1], x)
        yield x, labels[idx]


def materialize(images, batch_size: int = 256, desc: str | None = None) -> np.ndarray:
    """A FileSplit decoded into one uint8 array (evaluation-style resize); arrays pass."""
    if not isinstance(images, FileSplit):
        return images
    n = len(images)
    rows = [np.arange(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    out = np.zeros(images.shape, np.uint8)
    for row, (x, _) in zip(rows, batches(images, np.zeros(n, np.int32), rows, train=False)):
        out[row] = x
    return out


def concat(a, b):
    """Two splits as one (arrays or FileSplits of the same size)."""
    if isinstance(a, FileSplit):
        return dataclasses.replace(a, paths=np.concatenate([a.paths, b.paths]))
    return np.concatenate([a, b])


def epoch_batches(rng: np.random.Generator, n: int, batch_size: int) -> np.ndarray:
    """Shuffled indices for one epoch, as (steps, batch_size); the ragged tail is dropped."""
    steps = n // batch_size
    if steps == 0:
        raise DataError(f"{n} training images are fewer than one batch of {batch_size}")
    return rng.permutation(n)[: steps * batch_size].reshape(steps, batch_size)
