"""The programmatic API.

    from cnneb_jax import api
    cascade = api.load("runs/cifar")
    point = api.calibrate(cascade, data["calib_images"], data["calib_labels"], rule="expert",
                          max_drop=0.01)     # stored (operating_point_path): later loads use it
    out = api.predict(cascade, images)       # the stored operating point
    out = api.predict(cascade, images, rule="max_softmax", threshold=0.9)  # or any other
    out["labels"], out["probs"], out["exit"], out["flops"], out["names"]
    rows = api.predict_files(cascade, paths)  # image files: one row per file, errors too
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path

import numpy as np

from cnneb_jax import serving
from cnneb_jax.checkpoints import read_classes
from cnneb_jax.configs import validate
from cnneb_jax.controller import RULES, all_outputs, last_exit_flops, path_flops, run_cascade
from cnneb_jax.model import build_model
from cnneb_jax.programs import Cascade, make_cascade, warm_up
from cnneb_jax.recheck import CHECKED, RECHECK_FILE, Recheck, choose_margins, read_margins
from cnneb_jax.routing import softmax
from cnneb_jax.sweep import choose_threshold, sweep_rule

OPERATING_POINT_FILE = "operating_point.json"


def load(workdir: str | Path, max_batch: int = 256, warm: bool = True,
         compute_dtype: str | None = None) -> Cascade:
    """A trained workdir (both stages finished) or release folder as a ready-to-route
    cascade, with the operating point `calibrate` stored there, if any. `warm` compiles
    every bucket size now, so that no call compiles later (JAX's persistent compilation
    cache, see `cnneb_jax.compile_cache`, makes this fast after the first time).
    `compute_dtype` runs it in another precision than it trained in (configs.py), or in
    "bfloat16_checked": bfloat16 with its close calls rerun in float32 (recheck.py; the
    margins from `choose_recheck`), the fastest on CPUs with bfloat16 that kept the
    shipped model's labels (docs/RESULTS.md §8); "bfloat16_deep" keeps segment 0 in
    float32. Calibrate in the precision you serve in."""
    from cnneb_jax import compile_cache
    from cnneb_jax.workdir import load_trained
    if not isinstance(max_batch, numbers.Integral) or isinstance(max_batch, bool) \
            or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer; got {max_batch!r}")
    compile_cache.enable()
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise ValueError(f"{workdir} is not a folder (a trained workdir or a release)")
    model, variables = load_trained(workdir)
    recheck = None
    if compute_dtype == CHECKED:   # bfloat16, its close calls rerun in float32
        margins = read_margins(read_recheck(workdir), model.num_exits)
        reference = make_cascade(build_model(model.cfg.replace(compute_dtype="float32")),
                                 variables, max_batch)
        recheck, compute_dtype = Recheck(reference, margins), "bfloat16"
    if compute_dtype is not None:
        cfg = model.cfg.replace(compute_dtype=compute_dtype)
        validate(cfg)
        model = build_model(cfg)
    cascade = make_cascade(model, variables, max_batch, workdir, read_operating_point(workdir))
    cascade = dataclasses.replace(cascade, recheck=recheck)
    names = read_classes(workdir)
    if names is not None:
        if len(names) != model.cfg.num_classes:
            raise ValueError(f"{workdir}/class_names.json names {len(names)} classes, the "
                             f"model has {model.cfg.num_classes}")
        cascade = dataclasses.replace(cascade, class_names=tuple(names))
    if warm:
        warm_up(cascade)
        if recheck is not None:   # the reruns: each exit's plain path
            warm_up(recheck.reference, rules=(), reference=True)
    return cascade


def recheck_path(workdir: str | Path) -> Path:
    """Where a workdir's bfloat16_checked margins are (`choose_recheck`): its
    `precision_check.json`, shipped in a release folder too; a release without one keeps
    those chosen later in the cache, as `operating_point_path` does."""
    workdir = Path(workdir)
    from cnneb_jax.release import is_release
    if (workdir / RECHECK_FILE).exists() or not is_release(workdir):
        return workdir / RECHECK_FILE
    return _cache_path(workdir, "precision_checks")


def read_recheck(workdir: str | Path) -> dict:
    """The stored bfloat16_checked margins of `workdir`; refused with what to run when
    there are none."""
    path = recheck_path(workdir)
    if not path.exists():
        raise ValueError(f"{workdir} has no {RECHECK_FILE}: compute dtype {CHECKED} needs "
                         "its margins, chosen on held-out images first (api.choose_recheck, "
                         "or evaluate.py --compute-dtype bfloat16_checked --data-dir ..., "
                         "which chooses them on the held-out split)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is damaged ({e}); delete it and choose the margins again")


def choose_recheck(workdir: str | Path, images, target: float = 1.0, max_batch: int = 256,
                   save: bool = True) -> dict:
    """Chooses the margins of compute dtype bfloat16_checked (recheck.py) on held-out
    images (never test): per exit, the smallest top-2 margin below which rerunning in
    float32 gives float32's labels on at least `target` of these images. With `save`,
    stores them (`recheck_path`), so that `load(..., compute_dtype="bfloat16_checked")`
    finds them. Returns them with what they give on these images."""
    low = load(workdir, max_batch, warm=False, compute_dtype="bfloat16")
    ref = load(workdir, max_batch, warm=False, compute_dtype="float32")
    x = check_images(images, low.model.cfg.image_size)
    point = choose_margins(all_outputs(low, x)["exits"], all_outputs(ref, x)["exits"], target)
    if save:
        from cnneb_jax.checkpoints import write_json
        path = recheck_path(workdir)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, point)
    return point


def operating_point_path(workdir: str | Path) -> Path:
    """Where `calibrate` stores a cascade's point: in a workdir, `operating_point.json`;
    a release stays as shipped (it may sit in a repository or a read-only folder), so
    its point goes to `$CNNEB_CACHE/operating_points/` (default ~/.cache/cnneb_jax), named
    by the digest of the release's variables."""
    from cnneb_jax.release import is_release
    workdir = Path(workdir)
    if not is_release(workdir):
        return workdir / OPERATING_POINT_FILE
    return _cache_path(workdir, "operating_points")


def _cache_path(release: Path, folder: str) -> Path:
    """A file about a release kept outside it: $CNNEB_CACHE/`folder`/, named by the digest
    of its variables."""
    from cnneb_jax.cache import cache_root
    from cnneb_jax.lineage import file_digest
    from cnneb_jax.release import VARIABLES_FILE
    digest = file_digest(release / VARIABLES_FILE)[:16]
    return cache_root() / folder / f"{release.resolve().name}-{digest}.json"


def read_operating_point(workdir: str | Path) -> dict:
    """The point `calibrate` stored for `workdir` ({} if none; see operating_point_path)."""
    path = operating_point_path(workdir)
    if not path.exists():
        return {}
    try:
        point = json.loads(path.read_text())
        _check_rule(point["rule"], point["threshold"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is damaged ({e}); delete it and run api.calibrate again")
    return point


def check_images(images, image_size: int) -> np.ndarray:
    """uint8 in [0, 255] or float in [0, 1], shape (N, H, W, 3) or one (H, W, 3) image.
    Returns uint8 as given, float as float32 in [0, 255], with a batch axis; raises
    ValueError on anything else. The same function checks what `serving.predict` is given:
    one input convention."""
    return serving.check_images(images, (image_size, image_size, 3), keep_uint8=True)


def _check_labels(labels, n: int, num_classes: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},); got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers; got {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got [{y.min()}, {y.max()}]")
    return y


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_rule(rule, threshold=None) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {RULES}")
    if threshold is not None and not serving.is_threshold(threshold):
        raise ValueError(f"threshold must be a number in [0, 1]; got {threshold!r}")


def resolve_point(cascade: Cascade, rule, threshold) -> tuple[str, float]:
    """The rule and threshold to route with: the ones given, else the stored point."""
    stored = cascade.operating_point
    if rule is None:
        if not stored:
            raise ValueError("no rule given and no stored operating point: pass rule= and "
                             "threshold=, or run api.calibrate first (it stores one)")
        rule = stored["rule"]
    if threshold is None:
        if stored.get("rule") != rule:
            raise ValueError(f"no threshold given for rule {rule!r} and no stored operating "
                             f"point for it: pass threshold= or api.calibrate(..., rule={rule!r})")
        threshold = stored["threshold"]
    _check_rule(rule, threshold)
    return rule, float(threshold)


def predict(cascade: Cascade, images, rule: str | None = None, threshold: float | None = None,
            labels=None) -> dict[str, np.ndarray]:
    """Routes a batch. Without `rule` and `threshold`, the stored operating point (from
    `calibrate`) is used. Returns `labels` (predicted class), `probs` (softmax of the exit
    taken), `exit` (0 = O1, ..., m-1 = last exit), `flops` (cost of each sample's path) and,
    when the workdir stores the class names, `names` (the predicted class's name).
    `labels` (true classes) are needed only by the oracle rule."""
    rule, threshold = resolve_point(cascade, rule, threshold)
    cfg = cascade.model.cfg
    x = check_images(images, cfg.image_size)
    y = None if labels is None else _check_labels(labels, len(x), cfg.num_classes)
    return answer(cascade, run_cascade(cascade, x, rule, threshold, y))


def predict_files(cascade: Cascade, paths, rule: str | None = None,
                  threshold: float | None = None, batch_size: int | None = None,
                  progress: bool = False) -> list[dict]:
    """`predict` over image files, read as the config reads its data (RGB; resized and
    centre-cropped unless the config's resize is "none"), a batch at a time. Returns one
    row per file, in order: path, label, class_name (when the workdir names its classes),
    exit ("O1", ...), probability (of the predicted class), flops and error. A file that
    cannot be read gets a row with its error and empty fields, not an exception."""
    from tqdm.auto import tqdm

    from cnneb_jax.data import read_image
    from cnneb_jax.predictions import COLUMNS
    rule, threshold = resolve_point(cascade, rule, threshold)
    cfg = cascade.model.cfg
    paths = [str(p) for p in paths]
    batch_size = batch_size or cascade.max_batch
    rows: list[dict] = []
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
    for start in range(0, len(paths), batch_size):
        chunk = [{**dict.fromkeys(COLUMNS), "path": p} for p in paths[start:start + batch_size]]
        images, readable = [], []
        for row in chunk:
            try:
                images.append(read_image(row["path"], cfg.image_size, cfg.resize))
                readable.append(row)
            except (OSError, ValueError, SyntaxError) as e:
                row["error"] = f"{type(e).__name__}: {e}"
        if images:
            out = predict(cascade, np.stack(images), rule, threshold)
            for i, row in enumerate(readable):
                label = int(out["labels"][i])
                row.update(label=label, exit=f"O{int(out['exit'][i]) + 1}",
                           probability=float(out["probs"][i, label]),
                           flops=float(out["flops"][i]))
                if "names" in out:
                    row["class_name"] = str(out["names"][i])
        rows += chunk
        bar.update(len(chunk))
    bar.close()
    return rows


def answer(cascade: Cascade, routed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What `predict` returns, from the controller's per-sample logits, exits and FLOPs."""
    probs = softmax(routed["logits"])
    pred = {"labels": probs.argmax(-1), "probs": probs, "exit": routed["exit"],
            "flops": routed["flops"]}
    if cascade.class_names is not None:
        pred["names"] = np.asarray(cascade.class_names)[pred["labels"]]
    return pred


def calibrate(cascade: Cascade, images, labels, rule: str = "expert",
              max_drop: float | None = None, flops_budget: float | None = None,
              save: bool = True, alpha: float | None = None) -> dict:
    """Chooses a threshold on a labelled set (use the calibration split, never test): the
    largest FLOPs saving with accuracy at most `max_drop` (a fraction in [0, 1): 0.01 = one
    point) below the last exit alone, or the best accuracy within `flops_budget` FLOPs per
    image. With `alpha` (and `max_drop`), the threshold is certified instead (Learn-then-
    Test, `cnneb_jax.guarantee`): with probability at least 1 - `alpha` over the draw of
    these images, the expected drop on new images from the same distribution is at most
    `max_drop`; without it, the drop is met on these images
    only. The point becomes the cascade's default and, with `save`, is stored in its
    workdir for later loads. Returns it (rule, threshold, accuracy, flops, exit shares,
    the target) with the last exit's reference accuracy and FLOPs."""
    _check_rule(rule)
    if rule == "oracle":
        raise ValueError("the oracle is an upper bound and cannot be calibrated for use")
    if (max_drop is None) == (flops_budget is None):
        raise ValueError("give exactly one of max_drop and flops_budget")
    if max_drop is not None and not (_is_number(max_drop) and 0.0 <= max_drop < 1.0):
        raise ValueError(f"max_drop is a fraction in [0, 1) (0.01 = one point); got {max_drop!r}")
    if flops_budget is not None and not (_is_number(flops_budget) and flops_budget > 0
                                         and math.isfinite(flops_budget)):
        raise ValueError(f"flops_budget must be a positive number of FLOPs per image; "
                         f"got {flops_budget!r}")
    if alpha is not None and (max_drop is None or not (_is_number(alpha) and 0 < alpha < 1)):
        raise ValueError(f"alpha (a probability in (0, 1)) goes with max_drop; got {alpha!r}")
    cfg = cascade.model.cfg
    x = check_images(images, cfg.image_size)
    y = _check_labels(labels, len(x), cfg.num_classes)
    outputs = all_outputs(cascade, x)
    costs = path_flops(cascade, rule)
    ref_acc = float((outputs["exits"][-1].argmax(-1) == y).mean())
    if alpha is not None:
        from cnneb_jax.guarantee import choose_threshold_guaranteed
        chosen = choose_threshold_guaranteed(outputs, y, rule, costs, max_drop, alpha)
    else:
        chosen = choose_threshold(sweep_rule(outputs, y, rule, costs), ref_acc, max_drop,
                                  flops_budget)
    if chosen is None:
        if flops_budget is not None:
            raise ValueError(f"flops_budget {flops_budget:.4g} is below the cheapest path of "
                             f"rule {rule!r} ({costs[0]:.4g} FLOPs per image)")
        raise ValueError(f"no threshold of rule {rule!r} keeps accuracy within {max_drop} of "
                         f"the last exit ({ref_acc:.4f}) on these {len(y)} images")
    point = {"rule": rule, **chosen, "max_drop": max_drop, "flops_budget": flops_budget,
             "calibration_images": int(len(y)), "reference_accuracy": ref_acc,
             "reference_flops": last_exit_flops(cascade)}
    cascade.operating_point.clear()
    cascade.operating_point.update(point)
    if save and cascade.workdir is not None:
        from cnneb_jax.checkpoints import write_json
        path = operating_point_path(cascade.workdir)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, point)
    return point
