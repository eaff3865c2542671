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
import io
import os
import sys
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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def check_folder_layout(root: Path) -> list[str]:
    """Checks `root/{train,test}/<class>/<image>` before anything is decoded; returns the
    class names. Each kind of wrong layout gets its own message naming the folder."""
    if not root.is_dir():
        raise DataError(f"data dir {root} does not exist")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"data dir {root} has no '{split}/' folder "
                            f"(expected {root}/{split}/<class>/<image>)")
    classes = {}
    for split in ("train", "test"):
        d = root / split
        names = sorted(p.name for p in d.iterdir() if p.is_dir())
        if not names:
            loose = [p.name for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
            hint = (f"; its {len(loose)} images must sit in one subfolder per class"
                    if loose else "")
            raise DataError(f"{d} has no class folders{hint} "
                            f"(expected {d}/<class>/<image>)")
        ignored = []
        for name in names:
            files = [f for f in (d / name).iterdir() if not f.name.startswith(".")]
            if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in files):
                raise DataError(f"class folder {d / name} has no images "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
            ignored += [f"{name}/{f.name}" for f in files
                        if f.is_file() and f.suffix.lower() not in IMAGE_EXTENSIONS]
        if ignored:
            # The folder reader takes only these formats; say so instead of dropping them.
            print(f"warning: ignored {len(ignored)} file(s) in {split}/ that are not "
                  f"{', '.join(IMAGE_EXTENSIONS)}: " + ", ".join(ignored[:5])
                  + (" ..." if len(ignored) > 5 else ""), file=sys.stderr)
        classes[split] = names
    if classes["train"] != classes["test"]:
        only = sorted(set(classes["train"]) ^ set(classes["test"]))
        raise DataError(f"train/ and test/ of {root} have different class folders: {only}")
    return classes["train"]


def _folder_fingerprint(root: Path) -> str:
    h = hashlib.sha1(str(root.resolve()).encode())
    for split in ("train", "test"):
        d = root / split
        for cls in sorted(p.name for p in d.iterdir() if p.is_dir()):
            h.update(f"{split}/{cls}:{len(os.listdir(d / cls))}".encode())
    return h.hexdigest()[:12]


def _read_folder_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes one split with Pillow (file by file, so one bad file does not stop the rest).

    Unreadable or corrupt files are skipped and counted in a warning; images that are not
    RGB (grayscale, RGBA, palette) are converted and counted; images of differing sizes
    stop the read with a message naming examples of each size.
    """
    import tensorflow_datasets as tfds
    from PIL import Image

    ds = builder.as_dataset(split=split, shuffle_files=False,
                            decoders={"image": tfds.decode.SkipDecoding()})
    images, labels, names, bad, converted = [], [], [], [], []
    for batch in tfds.as_numpy(ds.batch(1024)):
        for raw, name, label in zip(batch["image"], batch["image/filename"], batch["label"]):
            name = name.decode()
            try:
                with Image.open(io.BytesIO(raw)) as im:
                    if im.mode != "RGB":
                        converted.append(f"{name} ({im.mode})")
                    arr = np.asarray(im.convert("RGB"))
            except (OSError, ValueError, SyntaxError) as e:
                bad.append(f"{name} ({type(e).__name__}: {e})")
                continue
            images.append(arr)
            labels.append(label)
            names.append(name)
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image file(s) in {split}/: "
              + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""), file=sys.stderr)
    if converted:
        print(f"warning: converted {len(converted)} non-RGB image(s) in {split}/ to RGB: "
              + ", ".join(converted[:5]) + (" ..." if len(converted) > 5 else ""),
              file=sys.stderr)
    if not images:
        raise DataError(f"no readable images in {split}/ ({len(bad)} files failed to decode)")
    by_size: dict[tuple, list[str]] = {}
    for arr, name in zip(images, names):
        by_size.setdefault(arr.shape[:2], []).append(name)
    if len(by_size) > 1:
        parts = [f"{len(v)} are {h}x{w} (e.g. {v[0]})" for (h, w), v in
                 sorted(by_size.items(), key=lambda kv: -len(kv[1]))]
        raise DataError(f"images in {split}/ differ in size: " + "; ".join(parts)
                        + ". Resize them to one size first.")
    return np.stack(images).astype(np.uint8), np.asarray(labels, np.int32)


def load_image_folder(root: str | Path, cache_dir: Path = DEFAULT_CACHE) -> dict[str, np.ndarray]:
    """Reads `root/{train,test}/<class>/*` once with tfds ImageFolder; caches the arrays."""
    root = Path(root)
    check_folder_layout(root)
    cache = Path(cache_dir) / f"{root.name}-{_folder_fingerprint(root)}.npz"
    if cache.exists():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    import tensorflow_datasets as tfds
    builder = tfds.folder_dataset.ImageFolder(str(root))
    classes = builder.info.features["label"].names
    out: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        x, y = _read_folder_split(builder, split)
        out[f"{split}_images"], out[f"{split}_labels"] = x, y
    if out["train_images"].shape[1:] != out["test_images"].shape[1:]:
        raise DataError(f"train images are {out['train_images'].shape[1:3]} but test images "
                        f"are {out['test_images'].shape[1:3]}")
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

    Without `data_dir`, or with a tfds data dir that holds `cfg.dataset`, the dataset is
    loaded through tfds; any other `data_dir` is read as an image folder.
    """
    if data_dir and not Path(data_dir).exists():
        raise DataError(f"data dir {data_dir} does not exist")
    if data_dir and not (Path(data_dir) / cfg.dataset).is_dir():
        # Not a tfds data dir holding the dataset: it must be an image folder.
        raw = load_image_folder(data_dir, cache_dir)
    else:
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


def augment(rng: jax.Array, images: jax.Array, pad: int, flip: bool = True) -> jax.Array:
    """Random crop with `pad` pixels of zero padding, then (if `flip`) a random horizontal
    flip. With `flip=False` the caller flips, e.g. by `alternating_flips`."""
    n, h, w, _ = images.shape
    k1, k2 = jax.random.split(rng)
    if pad > 0:
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offsets = jax.random.randint(k1, (n, 2), 0, 2 * pad + 1)
        crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1]))
        images = jax.vmap(crop)(padded, offsets)
    if not flip:
        return images
    mirror = jax.random.bernoulli(k2, 0.5, (n, 1, 1, 1))
    return jnp.where(mirror, images[:, :, ::-1, :], images)


def alternating_flips(seed: int, n: int, epoch: int) -> np.ndarray:
    """Which of `n` training images to mirror in `epoch`: a random half in epoch 0, then
    each image alternates, so every image is seen both ways in any two consecutive
    epochs (airbench's "alternating flip"; random flips repeat an orientation half the
    time). Depends only on (seed, epoch): a resumed run mirrors the same images."""
    first = np.random.default_rng([seed, 7919]).integers(0, 2, n).astype(bool)
    return first ^ bool(epoch % 2)


def epoch_batches(rng: np.random.Generator, n: int, batch_size: int) -> np.ndarray:
    """Shuffled indices for one epoch, as (steps, batch_size); the ragged tail is dropped."""
    steps = n // batch_size
    if steps == 0:
        raise DataError(f"{n} training images are fewer than one batch of {batch_size}")
    return rng.permutation(n)[: steps * batch_size].reshape(steps, batch_size)
