"""Data through tensorflow-datasets, decoded once and cached as uint8 arrays.

Sources:
  * an image folder (`train/<class>/*`, `test/<class>/*`) via tfds.folder_dataset.ImageFolder;
  * a tfds dataset by name (e.g. `cifar10`, downloaded when online) via tfds.load.
The splits are cut in splits.py; augmentation runs inside the jitted train step
(augment.py); larger datasets stream from their files (pipeline.py).
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import zipfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cnneb_jax import tfenv
from cnneb_jax.cache import cache_root
from cnneb_jax.configs import Config
from cnneb_jax.pipeline import DataError, FileSplit
from cnneb_jax.splits import split_dataset

# load_dataset's default from Python, read at import (the programs pass cache_root() itself)
DEFAULT_CACHE = cache_root()


def _decode_split(ds) -> tuple[np.ndarray, np.ndarray]:
    tfenv.quiet()
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
    # One temporary file per process: two processes decoding the same folder at once
    # (a search and a probe beside it) each finish, and the last rename wins.
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
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
    tfenv.quiet()
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
    `pipeline.FileSplit`s) with int32 labels, plus the class names (`splits.with_classes` fills a
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
