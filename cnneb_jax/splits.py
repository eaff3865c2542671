"""The splits a dataset is cut into: `train` (what the backbone trains on), `val` (held out
of train, for the experts' FT labels; its last `calib_size` images form `calib`, kept for
calibrating thresholds) and `test`. The held-out images are drawn at random, or as whole
groups of near-identical images (`group_pattern`), or given by the user (`--val-dir`)."""

from __future__ import annotations

import re

import numpy as np

from cnneb_jax.configs import Config
from cnneb_jax.pipeline import DataError


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
