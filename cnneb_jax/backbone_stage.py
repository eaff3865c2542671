"""The backbone stage: stem, trunk and every exit trained jointly,
loss = CE(O_m) + aux_weight * sum CE(O_i), with the `cifar` recipe's EMA, alternating
flips and progressive resizing as the config asks, or started from a Keras Inception v3
(`init_from`). It ends by reporting on itself (`heldout_report`) and writing
`backbone/result.json`; a finished stage is not retrained unless `retrain`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Collection

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnneb_jax import checkpoints as ckpt
from cnneb_jax import diagnostics, lineage, pipeline
from cnneb_jax.augment import augment, normalize
from cnneb_jax.configs import Config, augmentations_in_use
from cnneb_jax.evaluation import exit_accuracies, make_predict_fn, predict_all
from cnneb_jax.loop import StageSpec, run_stage
from cnneb_jax.model import (BACKBONE_GROUPS, Model, Variables, backbone_forward,
                             build_model, identity_kernels, init_variables,
                             merge_collections, segment_bounds, segment_name,
                             split_collections, whitening_kernel)
from cnneb_jax.optim import (backbone_optimizer, eval_variables, freeze_updates, next_state,
                             train_state)
from cnneb_jax.workdir import TrainingError, backbone_source, begin_stage, subset


def whiten_stem(cfg: Config, params: Variables, images: np.ndarray) -> Variables:
    """`params` with the first conv set to the whitening of `images`' patches (5,000 at most:
    the covariance of 27-dimensional patches needs no more)."""
    seg = segment_name(*segment_bounds(cfg)[0])
    conv = params["segments"][seg]["Conv2d_1a_3x3"]["conv"]
    kernel = whitening_kernel(images[:5000], cfg.stem_channels, input_norm=cfg.input_norm)
    out = jax.tree_util.tree_map(lambda a: a, params)  # fresh containers, same leaves
    out["segments"][seg]["Conv2d_1a_3x3"]["conv"] = {
        **conv, "kernel": jnp.asarray(kernel, conv["kernel"].dtype)}
    return out


def class_balance_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class loss weights n / (k * n_c): every class weighs the same in total (a class
    without training images gets weight 0)."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w.astype(np.float32)


def make_backbone_step(model: Model, cfg: Config, tx: optax.GradientTransformation,
                       size: int | None = None, total_steps: int = 0,
                       frozen: Collection[str] = (), class_w: np.ndarray | None = None):
    """The jitted backbone train step. `size` < image_size trains on the augmented images
    downscaled to size x size (progressive resizing, `cfg.lowres_size`). `total_steps`
    (the stage's) is needed by the lookahead only. `frozen` parts (imported weights, see
    `backbone_forward`) run in eval mode and are never updated. `class_w` (per class, see
    `class_balance_weights`) weights each image's cross-entropy by its class."""
    if cfg.lookahead_every and total_steps <= 0:
        raise ValueError("the lookahead needs the stage's total_steps")
    m = model.num_exits
    size = size or cfg.image_size

    def loss_fn(params, stats, x, y, rng):
        logits, _, new_stats = backbone_forward(model, params, stats, x, True, rng, frozen)
        targets = optax.smooth_labels(jax.nn.one_hot(y, cfg.num_classes), cfg.label_smoothing)
        if class_w is None:
            ce = [optax.softmax_cross_entropy(l, targets).mean() for l in logits]
        else:
            w = jnp.asarray(class_w)[y]
            ce = [jnp.sum(w * optax.softmax_cross_entropy(l, targets)) / jnp.sum(w)
                  for l in logits]
        loss = ce[-1] + cfg.aux_weight * sum(ce[:-1])
        accs = [jnp.mean(l.argmax(-1) == y) for l in logits]
        return loss, (new_stats, ce, accs)

    @jax.jit
    def step(state, images, labels, rng):
        k_aug, k_drop = jax.random.split(rng)
        x = normalize(augment(k_aug, images, cfg.pad_crop, flip=cfg.flip == "random",
                              pad_mode=cfg.pad_mode), cfg.input_norm)
        if size != x.shape[1]:
            x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "linear", antialias=True)
        (loss, (new_stats, ce, accs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["stats"], x, labels, k_drop)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        if frozen:
            updates = freeze_updates(updates, frozen)
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, **{f"acc_O{i + 1}": accs[i] for i in range(m)}}
        return next_state(cfg, state, params, new_stats, opt, total_steps), metrics

    return step


def _check_runs_at(model: Model, params: Variables, stats: Variables, size: int) -> None:
    """Refuses a low resolution the network cannot take (VALID padding shrinks a small
    input to nothing before the last blocks) before any training."""
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    try:
        feats = jax.eval_shape(lambda p, s, x: backbone_forward(model, p, s, x, False)[1],
                               params, stats, x)
        # An empty feature map traces fine and trains to NaN (the global mean of nothing).
        why = next((f"an empty {f.shape[1]}x{f.shape[2]} feature map" for f in feats
                    if 0 in f.shape), None)
    except Exception as e:  # shape errors surface as several flax / XLA types
        why = type(e).__name__
    if why is not None:
        raise TrainingError(f"lowres_size={size}: the network cannot run on {size}x{size} "
                            f"images ({why}); try a size nearer image_size, "
                            f"or 0 to turn progressive resizing off")


INIT_RECORD = "init_from.json"   # in backbone/: the imported weights a stage started from


def imported_start(cfg: Config, model: Model, variables: Variables, stage_dir: Path,
                   init_from: str | Path | None) -> tuple[Variables, tuple[str, ...], dict]:
    """The backbone stage's start from a Keras Inception v3 file (`init_from`), or from the
    one this stage recorded when it began (a resumed run). Returns (variables, frozen
    parts, record); without either, (variables, (), {}). Refuses a file other than the
    recorded one: the stage's checkpoints were trained from that."""
    from cnneb_jax import keras_import
    record_path = stage_dir / INIT_RECORD
    recorded = ckpt.read_json(record_path) if record_path.exists() else None
    if init_from is None and recorded is None:
        return variables, (), {}
    if recorded is None and (stage_dir / "ckpt").exists():
        raise TrainingError(f"{stage_dir} holds checkpoints of a run that did not start "
                            "from imported weights: --retrain to start afresh from them")
    if cfg.input_norm != "inception":
        raise TrainingError("Keras' Inception v3 weights expect inputs in [-1, 1]: "
                            "--set input_norm=inception (the imagenette_transfer config does)")
    source = Path(init_from if init_from is not None else recorded["path"])
    if not source.is_file():
        raise TrainingError(f"{stage_dir} started from {source}, which is gone: give it "
                            "again with --init-from, or --retrain to start afresh")
    digest = lineage.file_digest(source)
    if recorded is not None and recorded["sha256"] != digest:
        raise TrainingError(f"{stage_dir} started from {recorded['path']} (sha256 "
                            f"{recorded['sha256'][:12]}), not {source} ({digest[:12]}): "
                            "--retrain to start afresh from the new file")
    try:
        variables, report = keras_import.import_keras(source, model, variables)
    except keras_import.KerasImportError as e:
        raise TrainingError(f"--init-from {source}: {e}") from None
    frozen: tuple[str, ...] = ()
    if cfg.finetune == "heads":
        frozen = ("segments",) + tuple(f"heads/{h}" for h in report["heads"])
    record = {"path": str(source.resolve()), "sha256": digest, "finetune": cfg.finetune,
              "frozen": list(frozen), **report}
    if recorded is None:
        stage_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(record_path, record)
    print(f"[backbone] imported {report['conv_layers']} conv layers"
          + (f" and {', '.join(report['heads'])}" if report["heads"] else "")
          + f" from {source}; new: {', '.join(report['fresh'])}"
          + (f" ({report['why_fresh']})" if "why_fresh" in report else "")
          + ("; training the new heads only (finetune=heads)" if frozen
             else "; fine-tuning everything (finetune=all)"))
    return variables, frozen, record


def train_backbone(cfg: Config, data: dict, workdir: str | Path, retrain: bool = False,
                   init_from: str | Path | None = None) -> dict:
    """The backbone stage; `init_from` starts it from a Keras Inception v3 file (`.keras`
    or `.h5`, see cnneb_jax/keras_import.py) instead of random weights. One trainer per
    workdir: a second one is refused while this one runs."""
    with ckpt.workdir_lock(workdir):
        return _train_backbone(cfg, data, Path(workdir), retrain, init_from)


def _start(cfg: Config, model: Model, data: dict, stage_dir: Path,
           init_from: str | Path | None) -> tuple[Variables, Variables, tuple, dict]:
    """(params, stats, frozen parts, import record) the stage starts from: random (with
    the config's identity init or whitened stem) or imported (see `imported_start`). A
    stage that resumes gets zeros of the same shapes instead of random values, which its
    checkpoint then replaces (random init of the `full` trunk takes about 30 s here)."""
    importing = init_from is not None or (stage_dir / INIT_RECORD).exists()
    fresh = not ckpt.has_steps(stage_dir)
    variables = init_variables(model, jax.random.PRNGKey(cfg.seed),
                               init_segments=fresh and not importing)
    params, stats = split_collections(subset(variables, BACKBONE_GROUPS))
    if cfg.identity_init and fresh and not importing:
        params = identity_kernels(params)
    variables, frozen, init_record = imported_start(
        cfg, model, merge_collections(params, stats), stage_dir, init_from)
    params, stats = split_collections(variables)
    if cfg.whiten_stem and fresh and not init_record:
        params = whiten_stem(cfg, params, pipeline.materialize(data["train_images"][:5000]))
    return params, stats, frozen, init_record


def backbone_spec(cfg: Config, model: Model, tx: optax.GradientTransformation, data: dict,
                  frozen: Collection[str] = (), predict=None) -> StageSpec:
    """The backbone stage as the loop runs it: its train steps (a low-resolution one first
    with progressive resizing), flips and held-out images (`heldout_split`)."""
    n = len(data["train_images"])
    total = cfg.epochs * (n // cfg.batch_size)
    class_w = (class_balance_weights(data["train_labels"], cfg.num_classes)
               if cfg.class_balance == "loss" else None)
    steps = [(0, make_backbone_step(model, cfg, tx, total_steps=total, frozen=frozen,
                                    class_w=class_w))]
    if cfg.lowres_size and cfg.lowres_epochs:
        low_steps = round(cfg.lowres_epochs * (n // cfg.batch_size))
        steps = [(0, make_backbone_step(model, cfg, tx, cfg.lowres_size, total_steps=total,
                                        frozen=frozen, class_w=class_w)), (low_steps, steps[0][1])]
        print(f"[backbone] steps 1-{low_steps} at {cfg.lowres_size}x{cfg.lowres_size}, "
              f"the rest at {cfg.image_size}x{cfg.image_size}")
    heldout = heldout_split(data)
    return StageSpec("backbone", data["train_images"], data["train_labels"], cfg.batch_size,
                     cfg.epochs, tuple(steps), alternate_flips=cfg.flip == "alternate",
                     heldout=heldout, model=model, predict=predict,
                     eval_every=cfg.eval_every_epochs, eval_batch_size=cfg.eval_batch_size)


def _train_backbone(cfg: Config, data: dict, workdir: Path, retrain: bool,
                    init_from: str | Path | None) -> dict:
    stage_dir = workdir / "backbone"
    linked = backbone_source(workdir)
    if linked is not None:
        raise TrainingError(f"{workdir} takes its backbone from {linked} "
                            "(--backbone-from); it trains experts only")
    done = begin_stage(cfg, workdir, "backbone", retrain, data.get("class_names"))
    if done is not None:
        return done
    t_start = time.time()
    model = build_model(cfg)
    params, stats, frozen, init_record = _start(cfg, model, data, stage_dir, init_from)
    if cfg.lowres_size and cfg.lowres_epochs:
        _check_runs_at(model, params, stats, cfg.lowres_size)
    n = len(data["train_images"])
    tx = backbone_optimizer(cfg, n // cfg.batch_size)
    for line in augmentations_in_use(cfg):
        print(f"[backbone] augmentation {line}")
    imbalanced = diagnostics.imbalance_warning(data["train_labels"], data["class_names"],
                                               cfg.class_balance)
    if imbalanced:
        print(f"warning: {imbalanced}", file=sys.stderr)
    predict = make_predict_fn(model)
    spec = backbone_spec(cfg, model, tx, data, frozen, predict)
    state, last_heldout = run_stage(spec, workdir, cfg,
                                    train_state(tx, params, stats, ema=cfg.ema_decay > 0))
    variables = eval_variables(state)
    outputs = predict_all(model, variables, data["test_images"], cfg.eval_batch_size, "test",
                          predict=predict)
    result = {"test_accuracy": exit_accuracies(outputs, data["test_labels"]),
              "train_seconds": time.time() - t_start, "steps": spec.epochs * spec.steps_per_epoch,
              "train_images": n, "data": data.get("identity"),
              "variables_sha256": lineage.variables_digest(variables)}
    if init_record:
        result["init_from"] = init_record
    if len(spec.heldout[0]):
        result["heldout_report"] = heldout_report(model, variables, *spec.heldout,
                                                  data["class_names"], cfg.eval_batch_size,
                                                  predict, last_heldout)
    ckpt.write_json(stage_dir / "result.json", result)
    ckpt.log_metrics(workdir, {"stage": "backbone", "event": "test",
                               **{k: v for k, v in result.items() if k != "heldout_report"}})
    print("[backbone] test accuracy: " +
          ", ".join(f"{k} {v:.4f}" for k, v in result["test_accuracy"].items()))
    return result


def heldout_split(data: dict) -> tuple:
    """The images the backbone reports on while it trains and at its end: the held-out
    images the expert stage trains on, not the calibration split. Recipes and settings are
    chosen on these figures, and Learn-then-Test's guarantee holds only for a model chosen
    independently of the calibration images."""
    return data["val_images"], np.asarray(data["val_labels"])


def heldout_report(model: Model, variables: Variables, images, labels: np.ndarray,
                   class_names, batch_size: int, predict=None, outputs=None) -> dict:
    """The backbone's self-report on held-out images (printed, kept in result.json): each
    exit's worst classes and most confused pairs, and the last exit against O1, with a
    warning when it is not better by more than its standard error (diagnostics.py).
    `outputs`: `variables`' outputs on these images when already computed (the last
    epoch's evaluation), so they are not predicted twice."""
    out = outputs if outputs is not None else predict_all(model, variables, images,
                                                          batch_size, predict=predict)
    m = model.num_exits
    report = {"classes": {f"O{i + 1}": diagnostics.class_report(o, labels, class_names)
                          for i, o in enumerate(out["exits"])},
              "exit_gap": diagnostics.exit_gap(out["exits"], labels)}
    for i in (0, m - 1) if m > 1 else (0,):
        print("[backbone] held-out " + diagnostics.format_class_report(
            report["classes"][f"O{i + 1}"], f"O{i + 1}").replace("\n", "\n[backbone] held-out "))
    gap = report["exit_gap"]
    print(f"[backbone] held-out O1 {gap['O1']:.2%}, O{m} {gap[f'O{m}']:.2%}: difference "
          f"{gap['difference'] * 100:+.2f} ± {gap['standard_error'] * 100:.2f} pt "
          f"({gap['images']} images)")
    warning = diagnostics.exit_gap_warning(gap) if m > 1 else None
    if warning:
        report["warning"] = warning
        print(f"warning: {warning}", file=sys.stderr)
    return report
