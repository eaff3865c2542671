"""A trained workdir as a small release folder: what evaluation needs, nothing else.

    release.json        how it was made (command, source) and its measured accuracies
    config.json         the config it was trained with
    class_names.json    the class names in label order (when the workdir has them)
    variables.msgpack   eval variables of both stages (the EMA backbone when one was kept):
                        parameters and BatchNorm statistics, no optimizer state
    backbone/result.json, expert/result.json    the stages' own results

`workdir.save_release` writes one from a finished workdir; `workdir.load_trained` (so
`api.load`, `evaluate.py` and `export.py`) accepts a release folder wherever it accepts a
workdir. The release also records O1/O2 accuracy on a fixed
subset of test images (`reference_files`), so that a copy can be checked in seconds.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import serialization

from cnneb_jax import checkpoints as ckpt
from cnneb_jax.evaluation import exit_accuracies, predict_all
from cnneb_jax.model import Model, Variables, abstract_variables, build_model

VARIABLES_FILE = "variables.msgpack"


class ReleaseError(ValueError):
    """A release folder that is damaged or does not match its config."""


def is_release(path: str | Path) -> bool:
    return (Path(path) / VARIABLES_FILE).exists()


def reference_files(test_dir: str | Path, per_class: int) -> tuple[list[Path], np.ndarray]:
    """The first `per_class` files (by name) of every class folder of `test_dir`, classes
    in sorted order: a fixed subset anyone with the image folder can rebuild."""
    classes = sorted(d.name for d in Path(test_dir).iterdir() if d.is_dir())
    files, labels = [], []
    for k, cls in enumerate(classes):
        picked = sorted(Path(test_dir, cls).iterdir())[:per_class]
        files += picked
        labels += [k] * len(picked)
    return files, np.asarray(labels, np.int32)


def read_images(files: list[Path]) -> np.ndarray:
    from PIL import Image
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("RGB"), np.uint8))
    return np.stack(out)


def exit_accuracy_on(model: Model, variables: Variables, images: np.ndarray,
                     labels: np.ndarray) -> dict[str, float]:
    out = predict_all(model, variables, images, model.cfg.eval_batch_size)
    return exit_accuracies(out, labels)


def load_release(path: str | Path) -> tuple[Model, Variables]:
    """Model and eval variables of a release folder, checked against its config."""
    path = Path(path)
    cfg = ckpt.load_config(path)
    model = build_model(cfg)
    try:
        variables = serialization.msgpack_restore((path / VARIABLES_FILE).read_bytes())
    except Exception as e:  # msgpack raises several types for damaged bytes
        raise ReleaseError(f"{path / VARIABLES_FILE} cannot be read ({e}); "
                           "download or copy the release again") from None
    want = abstract_variables(model)
    got_paths = {jax.tree_util.keystr(p): np.shape(a)
                 for p, a in jax.tree_util.tree_leaves_with_path(variables)}
    for p, a in jax.tree_util.tree_leaves_with_path(want):
        key = jax.tree_util.keystr(p)
        if key not in got_paths:
            raise ReleaseError(f"{path / VARIABLES_FILE} lacks {key}: not made with this "
                               "config.json")
        if got_paths[key] != a.shape:
            raise ReleaseError(f"{path / VARIABLES_FILE}: {key} has shape {got_paths[key]}, "
                               f"the config needs {a.shape}")
    return model, jax.tree_util.tree_map(jax.numpy.asarray, variables)
