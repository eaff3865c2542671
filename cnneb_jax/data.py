"""Data through tensorflow-datasets, decoded once and cached as uint8 arrays.

Sources:
  * an image folder (`train/<class>/*`, `test/<class>/*`) via tfds.folder_dataset.ImageFolder;
  * a tfds dataset by name (e.g. `cifar10`, downloaded when online) via tfds.load.
Splits: `train` (what the backbone trains on), `val` (held out of train, for expert labels;
its last `calib_size` images form `calib`, kept for threshold calibration) and `test`.
Augmentation (random crop with padding, horizontal flip) runs inside the jitted train step.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cnneb_jax.configs import Config

DEFAULT_CACHE = Path(os.environ.get("CNNEB_CACHE", Path.home() / ".cache" / "cnneb_jax"))


class DataError(ValueError):
    """A problem with the user's data (missing folder, wrong layout, bad images)."""


def _decode_split(ds) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds
    images, labels = [], []
    for batch in tfds.as_numpy(ds.batch(1024)):
        images.append(batch["image"])
        labels.append(batch["label"])
    if not images:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0,), np.int32)
    return np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int32)


def _folder_fingerprint(root: Path) -> str:
    h = hashlib.sha1(str(root.resolve()).encode())
    for split in ("train", "test"):
        d = root / split
        for cls in sorted(p.name for p in d.iterdir() if p.is_dir()):
            h.update(f"{split}/{cls}:{len(os.listdir(d / cls))}".encode())
    return h.hexdigest()[:12]


def load_image_folder(root: str | Path, cache_dir: Path = DEFAULT_CACHE) -> dict[str, np.ndarray]:
    """Reads `root/{train,test}/<class>/*` once with tfds ImageFolder; caches the arrays."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data dir {root} does not exist")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"data dir {root} has no '{split}/' folder "
                            f"(expected {root}/{split}/<class>/<image>)")
    cache = Path(cache_dir) / f"{root.name}-{_folder_fingerprint(root)}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    import tensorflow_datasets as tfds
    builder = tfds.folder_dataset.ImageFolder(str(root))
    classes = builder.info.features["label"].names
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        x, y = _decode_split(builder.as_dataset(split=split, shuffle_files=False))
        out[f"{split}_images"], out[f"{split}_labels"] = x, y
    out["class_names"] = np.array(classes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, cache)  # atomic: a crash never leaves a half-written cache
    return out


def load_tfds(name: str, data_dir: str | None = None) -> dict[str, np.ndarray]:
    """`tfds.load(name)` (downloads when online, or reads a prepared `data_dir`)."""
    import tensorflow_datasets as tfds
    out: dict[str, np.ndarray] = {}
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare()
    for split in ("train", "test"):
        x, y = _decode_split(builder.as_dataset(split=split, shuffle_files=False))
        out[f"{split}_images"], out[f"{split}_labels"] = x, y
    out["class_names"] = np.array(builder.info.features["label"].names)
    return out


def load_dataset(cfg: Config, data_dir: str | None, cache_dir: Path = DEFAULT_CACHE
                 ) -> dict[str, np.ndarray]:
    """All splits as uint8 NHWC arrays and int32 labels: train, val, calib, test.

    `data_dir` holding `train/` and `test/` is read as an image folder; otherwise
    `cfg.dataset` is loaded through tfds (into `data_dir` if given).
    """
    if data_dir and (Path(data_dir) / "train").is_dir():
        raw = load_image_folder(data_dir, cache_dir)
    else:
        if data_dir and not Path(data_dir).exists():
            raise DataError(f"data dir {data_dir} does not exist")
        raw = load_tfds(cfg.dataset, data_dir)
    return split_dataset(cfg, raw)


def split_dataset(cfg: Config, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x, y = raw["train_images"], raw["train_labels"]
    n_cls = len(raw["class_names"])
    if n_cls != cfg.num_classes:
        raise DataError(f"the data has {n_cls} classes but config {cfg.name!r} expects "
                        f"{cfg.num_classes} (override with --set num_classes={n_cls})")
    if x.shape[1:3] != (cfg.image_size, cfg.image_size):
        raise DataError(f"images are {x.shape[1]}x{x.shape[2]}, config {cfg.name!r} expects "
                        f"{cfg.image_size}x{cfg.image_size}")
    if cfg.val_size >= len(x):
        raise DataError(f"val_size={cfg.val_size} leaves no training images ({len(x)} in all)")
    # A fixed permutation (seed 0, independent of the training seed) so that every run and
    # stage sees the same held-out images.
    perm = np.random.default_rng(0).permutation(len(x))
    val_idx, train_idx = perm[:cfg.val_size], perm[cfg.val_size:]
    if cfg.max_train_examples:
        train_idx = train_idx[:cfg.max_train_examples]
    xt, yt = raw["test_images"], raw["test_labels"]
    if cfg.max_test_examples:
        xt, yt = xt[:cfg.max_test_examples], yt[:cfg.max_test_examples]
    n_expert = cfg.val_size - cfg.calib_size
    return {
        "train_images": x[train_idx], "train_labels": y[train_idx],
        "val_images": x[val_idx[:n_expert]], "val_labels": y[val_idx[:n_expert]],
        "calib_images": x[val_idx[n_expert:]], "calib_labels": y[val_idx[n_expert:]],
        "test_images": xt, "test_labels": yt,
        "class_names": raw["class_names"],
    }


# Per-channel CIFAR-10 statistics; close enough for any natural-image dataset.
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32) * 255
STD = np.array([0.2470, 0.2435, 0.2616], np.float32) * 255


def normalize(images: jax.Array) -> jax.Array:
    """uint8 (or float in [0, 255]) NHWC -> standardised float32."""
    return (images.astype(jnp.float32) - MEAN) / STD


def augment(rng: jax.Array, images: jax.Array, pad: int) -> jax.Array:
    """Random crop with `pad` pixels of zero padding, then a random horizontal flip."""
    n, h, w, _ = images.shape
    k1, k2 = jax.random.split(rng)
    if pad > 0:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = jax.random.randint(k1, (n, 2), 0, 2 * pad + 1)
        crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1]))
        images = jax.vmap(crop)(padded, offsets)
    flip = jax.random.bernoulli(k2, 0.5, (n, 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def epoch_batches(rng: np.random.Generator, n: int, batch_size: int) -> np.ndarray:
    """Shuffled indices for one epoch, as (steps, batch_size); the ragged tail is dropped."""
    steps = n // batch_size
    if steps == 0:
        raise DataError(f"{n} training images are fewer than one batch of {batch_size}")
    return rng.permutation(n)[: steps * batch_size].reshape(steps, batch_size)
