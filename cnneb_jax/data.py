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
import random
import re
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cnneb_jax.configs import Config

# TensorFlow (under tfds and tf.data) prints C++ start-up lines on import; nothing here needs
# them, and oneDNN's reordered float ops (its one message) do not matter for decoding images.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
def cache_root() -> Path:
    """The user's cache folder: $CNNEB_CACHE, else ~/.cache/cnneb_jax (read when called)."""
    return Path(os.environ.get("CNNEB_CACHE", Path.home() / ".cache" / "cnneb_jax"))


DEFAULT_CACHE = cache_root()


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
        raise DataError(f"data dir {root} " + ("is a file, not a folder" if root.exists()
                                               else "does not exist"))
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


def content_keys(paths_by_split: dict[str, list[str]]) -> tuple[str, str]:
    """(cache key, data identity) of image files. The identity covers every file's class
    folder, name and size, not where the folder lies: the lineage a workdir records. The
    cache key also covers the absolute paths and modification times, so an image replaced
    in place (same name, same count) is decoded again instead of read back stale."""
    ident, cache = hashlib.sha256(), hashlib.sha256()
    for split in sorted(paths_by_split):
        for path in sorted(paths_by_split[split]):
            st = os.stat(path)
            rel = f"{split}/{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}"
            ident.update(f"{rel}:{st.st_size}\n".encode())
            cache.update(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return cache.hexdigest()[:16], ident.hexdigest()[:16]


def list_class_folder(d: Path, classes: list[str], order_seed: str) -> tuple[np.ndarray, np.ndarray]:
    """Paths and labels of `d/<class>/<image>`, in the order tfds' ImageFolder gives them
    (sorted by class, then by file name, then shuffled by `random.Random(order_seed)`, the
    split's name). Keeping that order keeps today's held-out split image for image."""
    examples = []
    for label, name in enumerate(classes):
        cdir = d / name
        if not cdir.is_dir():
            continue
        files = sorted(str(cdir / f) for f in os.listdir(cdir)
                       if f.lower().endswith(IMAGE_EXTENSIONS))
        examples += [(f, label) for f in files]
    random.Random(order_seed).shuffle(examples)
    return (np.array([e[0] for e in examples], dtype=object),
            np.array([e[1] for e in examples], np.int32))


def resize_crop(im, size: int):
    """PIL image -> its shorter side resized to `size` (aspect kept), centre-cropped to
    size x size."""
    from PIL import Image
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def read_image(path: str | Path, size: int, resize: str) -> np.ndarray:
    """One image file as the config reads it: a (size, size, 3) uint8 RGB array; unless
    `resize` is "none", its shorter side resized to `size` and centre-cropped. Raises
    ValueError for another size when `resize` is "none", OSError (or SyntaxError, from
    Pillow) for a file it cannot decode."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        arr = np.asarray(resize_crop(im, size) if resize != "none" else im)
    if arr.shape != (size, size, 3):
        raise ValueError(f"the image is {arr.shape[1]}x{arr.shape[0]}, the model takes "
                         f"{size}x{size} (the config's resize is 'none')")
    return arr


def list_images(root: str | Path) -> list[Path]:
    """Every image file (.jpg, .jpeg, .png, any case) under `root`, class folders or not,
    sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder" + (" (it is a file)" if root.exists()
                                                     else " (it does not exist)"))
    files = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files


def decode_files(paths, labels: np.ndarray, split: str, size: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decodes files with Pillow, one by one, so one bad file does not stop the rest.

    Returns (images, labels, kept): `kept` indexes the files that decoded. Unreadable or
    corrupt files are skipped and counted in a warning; images that are not RGB (grayscale,
    RGBA, palette) are converted and counted. With `size`, every image is resized (shorter
    side) and centre-cropped to size x size; without, images of differing sizes stop the
    read with a message naming examples of each size.
    """
    from PIL import Image

    images, kept, bad, converted = [], [], [], []
    for i, path in enumerate(tqdm(paths, desc=f"decoding {split}/", leave=False,
                                  disable=len(paths) < 5000)):
        name = os.path.relpath(path, Path(path).parents[1])
        try:
            with Image.open(path) as im:
                if im.mode != "RGB":
                    converted.append(f"{name} ({im.mode})")
                im = im.convert("RGB")
                arr = np.asarray(resize_crop(im, size) if size else im)
        except (OSError, ValueError, SyntaxError) as e:
            bad.append(f"{name} ({type(e).__name__}: {e})")
            continue
        images.append(arr)
        kept.append(i)
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
    for arr, i in zip(images, kept):
        by_size.setdefault(arr.shape[:2], []).append(os.path.basename(paths[i]))
    if len(by_size) > 1:
        parts = [f"{len(v)} are {h}x{w} (e.g. {v[0]})" for (h, w), v in
                 sorted(by_size.items(), key=lambda kv: -len(kv[1]))]
        raise DataError(f"images in {split}/ differ in size: " + "; ".join(parts)
                        + ". Resize them to one size first, or let the config resize them "
                        "(--set resize=resize_crop).")
    kept = np.asarray(kept, np.int64)
    return np.stack(images).astype(np.uint8), labels[kept], kept


def _decoded_bytes(n: int, size: int) -> int:
    return n * size * size * 3


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def use_streaming(cfg: Config, n_images: int) -> bool:
    """The rule for `pipeline=auto`: stream when the decoded images (uint8, at the config's
    size) would take more than a quarter of this machine's memory, or when every epoch needs
    the original files (`resize=random_resized_crop`); otherwise decode once into memory."""
    if cfg.pipeline != "auto":
        return cfg.pipeline == "stream"
    return (cfg.resize == "random_resized_crop"
            or _decoded_bytes(n_images, cfg.image_size) > physical_memory() // 4)


def load_image_folder(root: str | Path, cache_dir: Path = DEFAULT_CACHE, size: int | None = None,
                      val_dir: str | Path | None = None, files: dict | None = None
                      ) -> dict[str, np.ndarray]:
    """Reads `root/{train,test}/<class>/*` (and `val_dir/<class>/*`) once with Pillow and
    caches the arrays; `size` resizes and centre-crops every image (see `decode_files`).
    `files` is the folder's listing (`load_folder_files`) when the caller already has it."""
    root = Path(root)
    files = files or load_folder_files(root, val_dir)
    cache = Path(cache_dir) / f"{root.name}-{files['cache_key']}-v3{f'-s{size}' if size else ''}.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                return {**{k: z[k] for k in z.files}, "identity": files["identity"]}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            print(f"warning: the decoded-image cache {cache} is damaged ({type(e).__name__}: "
                  f"{e}); decoding the images again", file=sys.stderr)
            cache.unlink(missing_ok=True)
    out: dict[str, np.ndarray] = {}
    for split in [k[:-len("_images")] for k in files if k.endswith("_images")]:
        paths, labels = files[f"{split}_images"].paths, files[f"{split}_labels"]
        x, y, kept = decode_files(paths, labels, split, size)
        out[f"{split}_images"], out[f"{split}_labels"] = x, y
        out[f"{split}_files"] = files[f"{split}_files"][kept]
    if out["train_images"].shape[1:] != out["test_images"].shape[1:]:
        raise DataError(f"train images are {out['train_images'].shape[1:3]} but test images "
                        f"are {out['test_images'].shape[1:3]}")
    out["class_names"] = files["class_names"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, cache)  # atomic: a crash never leaves a half-written cache
    return {**out, "identity": files["identity"]}


def check_val_dir(d: Path, classes: list[str]) -> Path:
    """`--val-dir` must hold `<class>/<image>` with the training classes' folder names."""
    if not d.is_dir():
        raise DataError(f"val dir {d} does not exist")
    names = sorted(p.name for p in d.iterdir() if p.is_dir())
    unknown = sorted(set(names) - set(classes))
    if not names:
        raise DataError(f"val dir {d} has no class folders (expected {d}/<class>/<image>)")
    if unknown:
        raise DataError(f"val dir {d} has class folders the training data lacks: {unknown}")
    if not any(f.lower().endswith(IMAGE_EXTENSIONS) for n in names for f in os.listdir(d / n)):
        raise DataError(f"val dir {d} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return d


def load_folder_files(root: str | Path, val_dir: str | Path | None = None) -> dict:
    """The streaming path's stand-in for `load_image_folder`: file lists, nothing decoded."""
    from cnneb_jax.pipeline import FileSplit
    root = Path(root)
    classes = check_folder_layout(root)
    dirs = {"train": root / "train", "test": root / "test"}
    if val_dir is not None:
        dirs["val"] = check_val_dir(Path(val_dir), classes)
    out: dict = {"class_names": np.array(classes)}
    listed = {}
    for split, d in dirs.items():
        paths, labels = list_class_folder(d, classes, split)
        out[f"{split}_images"], out[f"{split}_labels"] = FileSplit(paths), labels
        out[f"{split}_files"] = np.array([os.path.basename(p) for p in paths])
        listed[split] = list(paths)
    out["cache_key"], out["identity"] = content_keys(listed)
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
    out["identity"] = f"tfds:{name}:{builder.version}"
    return out


def load_dataset(cfg: Config, data_dir: str | None, cache_dir: Path = DEFAULT_CACHE,
                 val_dir: str | None = None) -> dict:
    """Splits train, val, calib and test, each as uint8 NHWC arrays (or, when streaming,
    `pipeline.FileSplit`s) with int32 labels, plus the class names (`with_classes` fills a
    config's `num_classes` from them).

    Without `data_dir`, or with a tfds data dir that holds `cfg.dataset`, the dataset is
    loaded through tfds; any other `data_dir` is read as an image folder; `val_dir` (a folder
    of `<class>/<image>`) then supplies the held-out images instead of a random split.
    """
    if data_dir and not Path(data_dir).exists():
        raise DataError(f"data dir {data_dir} does not exist")
    if data_dir and not Path(data_dir).is_dir():
        raise DataError(f"data dir {data_dir} is a file, not a folder (give the folder that "
                        "holds train/ and test/)")
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise DataError(f"cache folder {cache_dir} is a file, not a folder (--cache-dir or "
                        "$CNNEB_CACHE)")
    if data_dir and not (Path(data_dir) / cfg.dataset).is_dir():
        # Not a tfds data dir holding the dataset: it must be an image folder.
        files = load_folder_files(data_dir, val_dir)
        n = sum(len(v) for k, v in files.items() if k.endswith("_labels"))
        if use_streaming(cfg, n):
            raw = files
            for k in [k for k in raw if k.endswith("_images")]:
                raw[k] = raw[k].with_size(cfg.image_size, cfg.resize)
        else:
            if cfg.resize == "random_resized_crop":
                raise DataError("resize=random_resized_crop crops the original files every "
                                "epoch: it needs pipeline=stream (or auto)")
            raw = load_image_folder(data_dir, cache_dir,
                                    cfg.image_size if cfg.resize != "none" else None, val_dir,
                                    files)
    else:
        if val_dir is not None:
            raise DataError("--val-dir needs --data-dir to be an image folder")
        if cfg.pipeline == "stream":
            raise DataError("pipeline=stream reads image folders; a tfds dataset by name "
                            "is decoded into memory (pipeline=auto or memory)")
        raw = load_tfds(cfg.dataset, data_dir)
    return split_dataset(cfg, raw)


def with_classes(cfg: Config, class_names) -> Config:
    """`cfg` with `num_classes` from the data (when 0); a stated count that disagrees with
    the data is an error."""
    n_cls = len(class_names)
    if cfg.num_classes == 0:
        return cfg.replace(num_classes=n_cls)
    if n_cls != cfg.num_classes:
        raise DataError(f"the data has {n_cls} classes but config {cfg.name!r} expects "
                        f"{cfg.num_classes} (override with --set num_classes={n_cls}, "
                        f"or 0 to take it from the data)")
    return cfg


def group_ids(files: np.ndarray, pattern: str) -> np.ndarray:
    """One group key per file name: the regular expression's first group (or whole match)."""
    rx = re.compile(pattern)
    keys, unmatched = [], []
    for f in files:
        m = rx.search(str(f))
        if m is None:
            unmatched.append(str(f))
            keys.append(None)
        else:
            keys.append(m.group(1) if rx.groups else m.group(0))
    if unmatched:
        raise DataError(f"group_pattern {pattern!r} matches no part of {len(unmatched)} file "
                        f"name(s), e.g. {unmatched[:3]}; every image needs a group")
    return np.array(keys)


def heldout_split(n: int, size: int, calib_size: int, files: np.ndarray | None = None,
                  pattern: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rest, val, calib) indices of n images: `size` held out, the last `calib_size` of
    them for calibration. A fixed permutation (seed 0, independent of the training seed),
    so every run and stage holds out the same images. With a group `pattern`, whole groups
    go to one side (calibration groups first, then val groups, until each is full), so
    near-identical images (frames of one video, shots of one object) never straddle it."""
    rng = np.random.default_rng(0)
    if not pattern:
        perm = rng.permutation(n)
        held = perm[:size]
        return perm[size:], held[:size - calib_size], held[size - calib_size:]
    if files is None:
        raise DataError("group_pattern groups images by file name: it needs an image folder "
                        "(--data-dir), not a tfds dataset by name")
    keys = group_ids(files, pattern)
    uniq, inverse = np.unique(keys, return_inverse=True)
    members = [[] for _ in uniq]
    for i, g in enumerate(inverse):
        members[g].append(i)
    val, calib, rest = [], [], []
    for g in rng.permutation(len(uniq)):
        if len(calib) < calib_size:
            calib += members[g]
        elif len(val) + len(calib) < size:
            val += members[g]
        else:
            rest += members[g]
    as_idx = lambda a: np.array(sorted(a), np.int64)
    return as_idx(rest), as_idx(val), as_idx(calib)


def split_dataset(cfg: Config, raw: dict) -> dict:
    x, y = raw["train_images"], raw["train_labels"]
    cfg = with_classes(cfg, raw["class_names"])
    if x.shape[1:3] != (cfg.image_size, cfg.image_size):
        raise DataError(f"images are {x.shape[1]}x{x.shape[2]}, config {cfg.name!r} expects "
                        f"{cfg.image_size}x{cfg.image_size} (or let it resize them: "
                        f"--set resize=resize_crop)")
    if "val_images" in raw:
        # Held-out images the user chose (--val-dir): all of train/ trains the backbone.
        xv, yv = raw["val_images"], raw["val_labels"]
        if cfg.calib_size >= len(xv):
            raise DataError(f"calib_size={cfg.calib_size} leaves no expert images in the "
                            f"val dir ({len(xv)} images)")
        _, val_idx, cal_idx = heldout_split(len(xv), len(xv), cfg.calib_size,
                                            raw.get("val_files"), cfg.group_pattern)
        train_idx = np.random.default_rng(0).permutation(len(x))
        held = {"val_images": xv[val_idx], "val_labels": yv[val_idx],
                "calib_images": xv[cal_idx], "calib_labels": yv[cal_idx]}
    else:
        if cfg.val_size >= len(x):
            raise DataError(f"val_size={cfg.val_size} leaves no training images "
                            f"({len(x)} in all)")
        train_idx, val_idx, cal_idx = heldout_split(len(x), cfg.val_size, cfg.calib_size,
                                                    raw.get("train_files"), cfg.group_pattern)
        held = {"val_images": x[val_idx], "val_labels": y[val_idx],
                "calib_images": x[cal_idx], "calib_labels": y[cal_idx]}
    if cfg.max_train_examples:
        train_idx = train_idx[:cfg.max_train_examples]
    xt, yt = raw["test_images"], raw["test_labels"]
    if cfg.max_test_examples:
        xt, yt = xt[:cfg.max_test_examples], yt[:cfg.max_test_examples]
    return {"train_images": x[train_idx], "train_labels": y[train_idx], **held,
            "test_images": xt, "test_labels": yt, "class_names": raw["class_names"],
            "identity": raw.get("identity")}


# Per-channel CIFAR-10 statistics; close enough for any natural-image dataset.
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32) * 255
STD = np.array([0.2470, 0.2435, 0.2616], np.float32) * 255


INPUT_NORMS = ("cifar", "inception")


def normalize(images: jax.Array, mode: str = "cifar") -> jax.Array:
    """uint8 (or float in [0, 255]) NHWC -> float32: "cifar" standardises each channel with
    CIFAR-10's mean and deviation; "inception" scales to [-1, 1], as Keras' Inception v3
    (`preprocess_input`) and weights imported from it expect."""
    if mode == "inception":
        return images.astype(jnp.float32) / 127.5 - 1.0
    if mode != "cifar":
        raise ValueError(f"unknown input_norm {mode!r}; one of {INPUT_NORMS}")
    return (images.astype(jnp.float32) - MEAN) / STD


def augment(rng: jax.Array, images: jax.Array, pad: int, flip: bool = True,
            pad_mode: str = "zeros") -> jax.Array:
    """Random crop with `pad` pixels of padding (`pad_mode` "zeros" or "reflect"), then (if
    `flip`) a random horizontal flip. With `flip=False` the caller flips, e.g. by
    `alternating_flips`."""
    n, h, w, _ = images.shape
    k1, k2 = jax.random.split(rng)
    if pad > 0:
        mode = {"zeros": "constant", "reflect": "reflect"}[pad_mode]
        padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
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
