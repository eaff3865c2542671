"""Shared fixtures: a tiny image folder (a few real CIFAR-10 JPEGs when the shared copy is
beside the repo, generated images otherwise) and the tiny config."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from cnneb_jax.configs import get_config  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def make_image_folder(root: Path, n_train: int = 8, n_test: int = 2) -> Path:
    """root/{train,test}/<class>/*.jpg with n images per class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in CLASSES:
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            src = SHARED / split / cls
            files = sorted(src.iterdir())[:n] if src.is_dir() else []
            for i in range(n):
                if i < len(files):
                    shutil.copy(files[i], d / f"{i:04d}.jpg")
                else:
                    from PIL import Image
                    Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(
                        d / f"{i:04d}.jpg")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("folder") / "cifar-mini")


@pytest.fixture(scope="session")
def tiny_cfg():
    return get_config("tiny")


@pytest.fixture(scope="session")
def tiny_data(image_folder, tiny_cfg, tmp_path_factory):
    from cnneb_jax.data import load_dataset
    return load_dataset(tiny_cfg, str(image_folder), tmp_path_factory.mktemp("cache"))
