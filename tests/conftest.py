"""Shared fixtures: a tiny image folder (a few real CIFAR-10 JPEGs when the shared copy is
beside the repo, generated images otherwise), the tiny config, one decode cache and one tiny
workdir with both stages trained, shared by the whole session.

Every process the tests start (this one and the CLI subprocesses) shares one JAX persistent
compilation cache in a fresh folder, so a program compiled once is not compiled again.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Set before JAX is imported anywhere; subprocesses inherit the environment.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # Made by the first pytest process (the xdist controller), removed when it exits.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cnneb-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Each xdist worker's oneDNN calls on one OpenMP thread (set before the kernels' library
# loads GNU OpenMP): with two workers on two cores, two threads per worker made oneDNN's
# BatchNorm, which waits at spinning barriers, stall behind the other worker's threads.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite compiles many programs once each and runs them for a few steps: at LLVM's
# optimisation level 0 XLA:CPU compiles them faster (experiments/cold_tiny_stage.py times a
# cold tiny backbone stage with and without). The cascade's programs keep their own level
# (programs._compile), as in use.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

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
def decode_cache(tmp_path_factory) -> Path:
    """One decoded-image cache for every in-process load and every CLI subprocess."""
    return tmp_path_factory.mktemp("decode-cache")


@pytest.fixture(scope="session")
def tiny_cfg():
    return get_config("tiny")


@pytest.fixture(scope="session")
def tiny_data(image_folder, tiny_cfg, decode_cache):
    from cnneb_jax.data import load_dataset
    return load_dataset(tiny_cfg, str(image_folder), decode_cache)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_run(tiny_cfg, tiny_data, tmp_path_factory):
    """(workdir, backbone result, expert result): both stages of the tiny config, trained
    once for the whole test run. Read it freely; copy it (`copy_workdir`) before changing it.
    Under pytest-xdist (`-n 2`, pyproject.toml) the first worker to ask trains it in the
    run's shared temporary folder while the other waits on a lock, then both read it."""
    from cnneb_jax.backbone_stage import train_backbone
    from cnneb_jax.expert_stage import train_expert
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    workdir = shared / "tiny-run"
    with _exclusive(shared / "tiny-run.lock"):
        b = train_backbone(tiny_cfg, tiny_data, workdir)  # returns the result once trained
        e = train_expert(tiny_cfg, tiny_data, workdir)
    return workdir, b, e


@pytest.fixture(scope="session")
def tiny_workdir(tiny_run) -> Path:
    return tiny_run[0]


@pytest.fixture(scope="session")
def tiny_variants_run(tiny_cfg, tiny_data, tmp_path_factory):
    """(workdir, backbone result, expert result, train sizes): the tiny config with three
    exits, an EMA and progressive resizing (the first epoch at 24x24), both stages trained
    once for the session and shared like `tiny_run`; each feature's test reads it, instead
    of each training a backbone of its own. `train sizes` are the image sizes the train
    steps were traced at, in order."""
    import json
    from cnneb_jax import backbone_stage
    from cnneb_jax.expert_stage import train_expert
    cfg = tiny_cfg.replace(branch_points=("Mixed_5b", "Mixed_6e"), epochs=2, expert_epochs=4,
                           eval_every_epochs=0, ema_decay=0.9, lowres_size=24,
                           lowres_epochs=1.0)
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    workdir, sizes_file = shared / "tiny-variants", shared / "tiny-variants-sizes.json"
    with _exclusive(shared / "tiny-variants.lock"):
        if not sizes_file.exists():
            sizes, forward = [], backbone_stage.backbone_forward

            def spy(model, params, stats, x, train, rng=None, frozen=()):
                if train:
                    sizes.append(x.shape[1])   # once per trace of a train step
                return forward(model, params, stats, x, train, rng, frozen)

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(backbone_stage, "backbone_forward", spy)
                backbone_stage.train_backbone(cfg, tiny_data, workdir)
            sizes_file.write_text(json.dumps(sizes))
        b = backbone_stage.train_backbone(cfg, tiny_data, workdir)  # the result, once trained
        e = train_expert(cfg, tiny_data, workdir)
    return workdir, b, e, json.loads(sizes_file.read_text())


@pytest.fixture(scope="session")
def tiny_ablation(tiny_run, tiny_cfg, tiny_data) -> Path:
    """A workdir whose experts take only O1's softmax (`expert_inputs="paper"`, where the
    tiny config adds the confidence features), trained on the tiny run's own backbone
    (`train_expert(backbone_from=...)`), shared like `tiny_run`."""
    from cnneb_jax.expert_stage import train_expert
    workdir = tiny_run[0].parent / "tiny-ablation"
    with _exclusive(tiny_run[0].parent / "tiny-ablation.lock"):
        train_expert(tiny_cfg.replace(expert_inputs="paper"), tiny_data, workdir,
                     backbone_from=tiny_run[0])
    return workdir


def copy_workdir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def leaves_equal(a, b) -> bool:
    """Whether two pytrees hold the same arrays, bit for bit."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def pytest_collection_modifyitems(config, items):
    """Modules that use the shared tiny run first, the rest after (each module's tests
    stay together and in order). pytest-xdist hands each worker a contiguous share of this
    list: the first worker trains the tiny run while the second starts on tests that do
    not need it, instead of waiting on the run's lock."""
    needs = {}
    for item in items:
        needs[item.module] = needs.get(item.module, False) or "tiny_run" in item.fixturenames
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (not needs[item.module], order[id(item)]))
