"""Staged training with optax.

* `backbone`: stem, trunk, O1..O(m-1) and O_m jointly; loss = CE(O_m) + w * sum CE(O_i).
* `expert`:   backbone and exits frozen; the proposed experts E_i and the "Auxiliary+5b"
              experts learn FT vs Other on held-out images the backbone never trained on.
Each stage checkpoints with Orbax every `checkpoint_every_steps`, resumes from the latest
step when rerun, and ends by writing `<stage>/result.json` (then it is not retrained unless
`retrain=True`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Collection

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from cnneb_jax import checkpoints as ckpt
from cnneb_jax import distributed as dist
from cnneb_jax import diagnostics, lineage, pipeline, release
from cnneb_jax.diagnostics import expert_aucs
from cnneb_jax.configs import Config, augmentations_in_use
from cnneb_jax.data import alternating_flips, augment, epoch_batches, normalize
from cnneb_jax.heads import FT, OTHER
from cnneb_jax.metrics import ft_labels
from cnneb_jax.model import (BACKBONE_GROUPS, EXPERT_GROUPS, Model, Variables,
                             abstract_variables, backbone_forward, build_model,
                             expert_forward, identity_kernels, init_variables, is_frozen,
                             merge_collections, segment_bounds, segment_name,
                             split_collections, whitening_kernel)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, missing earlier stage)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a training loop; the message says where to resume from."""


def _subset(tree: Variables, groups: tuple[str, ...]) -> Variables:
    return {g: tree[g] for g in groups}


def _decay_mask(params: Any) -> Any:
    # Weight decay on conv/dense kernels only, not on biases or BatchNorm offsets.
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(lr: float, total_steps: int, warmup_steps: int, weight_decay: float,
                   momentum: float | None, start: float = 0.0,
                   end: float = 0.0) -> optax.GradientTransformation:
    """Linear warm-up from start * lr, then linear decay to end * lr; SGD+Nesterov
    (momentum) or Adam (None)."""
    warmup_steps = max(1, min(warmup_steps, total_steps - 1))
    sched = optax.join_schedules(
        [optax.linear_schedule(start * lr, lr, warmup_steps),
         optax.linear_schedule(lr, end * lr, max(1, total_steps - warmup_steps))], [warmup_steps])
    base = (optax.sgd(sched, momentum, nesterov=True) if momentum is not None
            else optax.adam(sched))
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=_decay_mask), base)


def _backbone_label(path, whiten_stem: bool) -> str:
    keys = [getattr(k, "key", None) for k in path]
    if whiten_stem and "Conv2d_1a_3x3" in keys and keys[-1] == "kernel":
        return "frozen"
    if len(keys) >= 2 and keys[-1] == "bias" and keys[-2] == "bn":
        return "bn_bias"
    return "rest"


def backbone_optimizer(cfg: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The backbone's SGD+Nesterov; BatchNorm offsets at `bn_bias_lr_mult` times the lr; a
    whitening first conv stays frozen (no update, no weight decay)."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    tx = lambda lr: make_optimizer(lr, total, warmup, cfg.weight_decay, cfg.momentum,
                                   cfg.lr_start, cfg.lr_end)
    if cfg.bn_bias_lr_mult == 1.0 and not cfg.whiten_stem:
        return tx(cfg.lr)
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: _backbone_label(path, cfg.whiten_stem), params)
    return optax.multi_transform({"rest": tx(cfg.lr), "bn_bias": tx(cfg.lr * cfg.bn_bias_lr_mult),
                                  "frozen": optax.set_to_zero()}, labels)


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


def init_ema(params: Variables, stats: Variables) -> dict:
    return {"params": params, "stats": stats, "count": jnp.zeros((), jnp.float32)}


def update_ema(ema: dict, params: Variables, stats: Variables, decay: float) -> dict:
    """One EMA step; the decay ramps up as (1+t)/(10+t) so early weights fade quickly."""
    count = ema["count"]
    d = jnp.minimum(decay, (1.0 + count) / (10.0 + count))
    mix = lambda e, x: d * e + (1.0 - d) * x
    return {"params": jax.tree_util.tree_map(mix, ema["params"], params),
            "stats": jax.tree_util.tree_map(mix, ema["stats"], stats), "count": count + 1.0}


def lookahead(ema: dict, params: Variables, stats: Variables, decay: float, every: int,
              start_step: float, total_steps: int) -> tuple[dict, Variables, Variables]:
    """One step of airbench's lookahead: (EMA, weights, BatchNorm statistics) after it.
    Before `start_step` the EMA is the weights; then every `every` steps the EMA takes a
    step toward the weights with decay `decay**every * progress**3` (weak at first, strong
    at the end) and the weights are reset to it; between those steps both run free."""
    count = ema["count"] + 1.0
    rho = jnp.where(count < start_step, 0.0,
                    jnp.where(jnp.mod(count, every) == 0,
                              decay ** every * (count / total_steps) ** 3, 1.0))
    mix = lambda e, x: rho * e + (1.0 - rho) * x
    new = {"params": jax.tree_util.tree_map(mix, ema["params"], params),
           "stats": jax.tree_util.tree_map(mix, ema["stats"], stats), "count": count}
    reset = lambda e, x: jnp.where(rho < 1.0, e, x)
    return (new, jax.tree_util.tree_map(reset, new["params"], params),
            jax.tree_util.tree_map(reset, new["stats"], stats))


def next_state(cfg: Config, state: dict, params: Variables, stats: Variables, opt: Any,
               total_steps: int) -> dict:
    """The training state after a step's update, with the step's weight averaging if the
    state keeps an EMA: the plain EMA (weights untouched) or, with `lookahead_every`, the
    lookahead (which may reset the weights and statistics)."""
    if "ema" not in state:
        return {"params": params, "stats": stats, "opt": opt}
    if cfg.lookahead_every:
        ema, params, stats = lookahead(state["ema"], params, stats, cfg.ema_decay,
                                       cfg.lookahead_every, cfg.lookahead_start * total_steps,
                                       total_steps)
    else:
        ema = update_ema(state["ema"], params, stats, cfg.ema_decay)
    return {"params": params, "stats": stats, "opt": opt, "ema": ema}


def backbone_state(cfg: Config, tx: optax.GradientTransformation, params: Variables,
                   stats: Variables) -> dict:
    """The backbone stage's training state: parameters, BatchNorm statistics, optimizer
    state and (with `ema_decay`) the EMA."""
    state = {"params": params, "stats": stats, "opt": tx.init(params)}
    if cfg.ema_decay > 0:
        state["ema"] = init_ema(params, stats)
    return state


# ----------------------------------------------------------------------------- evaluation

def make_predict_fn(model: Model):
    """Eval-mode outputs of every exit and expert for a batch (one jit, for evaluation).

    The early-exit controller uses the per-segment functions instead; this one computes
    everything and is only for measuring heads and experts.
    """
    m = model.num_exits

    @jax.jit
    def predict(variables, images):
        params, stats = split_collections(variables)
        x = normalize(images, model.cfg.input_norm)
        logits, feats, _ = backbone_forward(model, params, stats, x, train=False)
        out = {"exits": logits}
        if "experts" in params and params["experts"]:
            out["experts"] = [expert_forward(model, params, stats, "experts", i, feats[i],
                                             logits[i], False)[0] for i in range(m - 1)]
            out["aux5b"] = [expert_forward(model, params, stats, "aux5b", i, feats[i],
                                           logits[i], False)[0] for i in range(m - 1)]
        return out

    return predict


def predict_all(model: Model, variables: Variables, images: np.ndarray, batch_size: int,
                desc: str | None = None, predict=None) -> dict[str, list[np.ndarray]]:
    """Runs `make_predict_fn` over a whole split; pads the last batch to a fixed shape.
    Pass `predict` (from `make_predict_fn`) to reuse its compilation across calls."""
    predict = predict or make_predict_fn(model)
    mesh = dist.data_mesh()
    variables = dist.replicate(mesh, variables)
    # Batches are split over all devices: round the batch up to a multiple of their count.
    batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
    chunks: list[Any] = []
    n = len(images)
    rows = [np.arange(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    stream = pipeline.batches(images, np.zeros(n, np.int32), rows, train=False)
    for batch, _ in tqdm(stream, total=len(rows), desc=desc, leave=False, disable=desc is None):
        pad = batch_size - len(batch)
        if pad:
            batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
        out = dist.to_host(predict(variables, *dist.shard_batch(mesh, batch)))
        chunks.append(jax.tree_util.tree_map(lambda a: a[:len(a) - pad] if pad else a, out))
    return {k: [np.concatenate([c[k][i] for c in chunks]) for i in range(len(chunks[0][k]))]
            for k in chunks[0]}


def exit_accuracies(outputs: dict, labels: np.ndarray) -> dict[str, float]:
    return {f"O{i + 1}": float((o.argmax(-1) == labels).mean())
            for i, o in enumerate(outputs["exits"])}


# ----------------------------------------------------------------------------- backbone

def freeze_updates(updates: Variables, frozen: Collection[str]) -> Variables:
    """`updates` with the frozen parts' set to zero (weight decay would move them)."""
    return {group: {name: (jax.tree_util.tree_map(jnp.zeros_like, u)
                           if is_frozen(group, name, frozen) else u)
                    for name, u in parts.items()}
            for group, parts in updates.items()}


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


def _stage_done(stage_dir: Path) -> dict | None:
    path = stage_dir / "result.json"
    if path.exists():
        return ckpt.read_json(path)
    return None


def _begin_stage(cfg: Config, workdir: Path, stage: str, retrain: bool,
                 class_names=None) -> dict | None:
    """Checks the workdir's config (and class names); returns the stage's result if it
    already finished (and `retrain` is off); with `retrain`, removes the stage's
    checkpoints."""
    ckpt.check_config(workdir, cfg)
    if class_names is not None:
        ckpt.record_classes(workdir, class_names)
    stage_dir = workdir / stage
    done = _stage_done(stage_dir)
    if done is not None and not retrain:
        print(f"[{stage}] already trained in {stage_dir} (use --retrain to train again)")
        return done
    if retrain and stage_dir.exists():
        shutil.rmtree(stage_dir)
    dependent = workdir / "expert"
    if stage == "backbone" and retrain and dependent.exists():
        aside = workdir / f"expert.stale-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(dependent, aside)
        print(f"[backbone] --retrain: the expert stage trained on the old backbone no longer "
              f"fits it; moved to {aside} (train it again with --stage expert)")
    return None


def _run_loop(stage: str, workdir: Path, cfg: Config, state: dict, step_fn, images: np.ndarray,
              labels: np.ndarray, batch_size: int, epochs: int, extra_args: tuple = (),
              on_epoch_end=None, mirror=None, step_for=None) -> dict:
    """The shared loop: shuffling, resume, progress bar, metrics log, checkpoints.
    `on_epoch_end(epoch, state)` may return a dict, logged as that epoch's evaluation.
    `step_for(step)`, if given, picks the step function of each step instead of `step_fn`.
    `mirror(epoch)`, if given, says which images to flip horizontally in that epoch."""
    stage_dir = workdir / stage
    mngr = ckpt.manager(stage_dir)
    n = len(images)
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch
    if steps_per_epoch == 0:
        raise TrainingError(f"{stage}: {n} images are fewer than one batch of {batch_size}")
    # Data parallel: parameters and optimizer state replicated, every batch split over
    # all devices (a no-op layout on a single device).
    mesh = dist.data_mesh()
    dist.check_batch(batch_size)
    state = dist.replicate(mesh, state)
    extra_args = dist.replicate(mesh, extra_args)
    start = 0
    restored = ckpt.restore_latest(mngr, state)
    if restored is not None:
        start, state, _ = restored
        print(f"[{stage}] resuming from step {start}/{total}")
    key = jax.random.PRNGKey(cfg.seed)
    pbar = tqdm(total=total, initial=start, desc=stage, unit="step", dynamic_ncols=True)
    stream, t0, seen, last = None, time.perf_counter(), 0, {}
    rows = dist.process_rows(batch_size)
    done = saved = start
    metrics = last_fn = None
    # Each step records the config it was trained with: a config.json edited later is
    # then named field by field (checkpoints.restore_latest).
    meta = lambda step: {"step": step, "stage": stage, "config": dataclasses.asdict(cfg)}
    try:
        for step in range(start, total):
            epoch, i = divmod(step, steps_per_epoch)
            if stream is None or i == 0:
                # The order depends only on (seed, epoch): a resumed run sees the same batches.
                perm = epoch_batches(np.random.default_rng([cfg.seed, epoch]), n, batch_size)
                stream = pipeline.batches(images, labels, perm[i:, rows], train=True,
                                          seed=cfg.seed, epoch=epoch,
                                          mirror=mirror(epoch) if mirror is not None else None)
            batch_images, batch_labels = dist.shard_local(mesh, batch_size, *next(stream))
            fn = step_for(step) if step_for is not None else step_fn
            if fn is not last_fn:
                # A new step function (another resolution): img/s restarts, so that it
                # never averages two step speeds.
                t0, seen, last_fn = time.perf_counter(), 0, fn
            state, metrics = fn(state, batch_images, batch_labels,
                                jax.random.fold_in(key, step), *extra_args)
            done = step + 1
            seen += batch_size
            saving = done % cfg.checkpoint_every_steps == 0 or done == total
            # Check the loss before every save, so a checkpoint never holds diverged parameters.
            if done % 10 == 0 or saving:
                last = {k: float(v) for k, v in metrics.items()}
                if not math.isfinite(last["loss"]):
                    raise TrainingError(f"{stage}: loss became {last['loss']} at step {done}; "
                                        f"the last good checkpoint is kept in {stage_dir / 'ckpt'}")
                rate = seen / (time.perf_counter() - t0)
                pbar.set_postfix({**{k: f"{v:.3f}" for k, v in last.items()}, "img/s": f"{rate:.0f}"})
                ckpt.log_metrics(workdir, {"stage": stage, "step": done, "epoch": epoch,
                                           "img_per_s": rate, **last})
            pbar.update(1)
            if saving:
                ckpt.save(mngr, done, state, meta(done))
                saved = done
            if on_epoch_end is not None and done % steps_per_epoch == 0:
                t_eval = time.perf_counter()
                res = on_epoch_end(epoch + 1, state)
                if res:
                    ckpt.log_metrics(workdir, {"stage": stage, "event": "epoch", "epoch": epoch + 1,
                                               "step": done, **res})
                    pbar.write(f"[{stage}] epoch {epoch + 1}: " +
                               ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
                t0 += time.perf_counter() - t_eval  # keep img/s about training only
    except KeyboardInterrupt:
        pbar.close()
        # Keep the steps done so far (unless the loss had diverged): nothing is lost.
        if done > saved and metrics is not None and math.isfinite(float(metrics["loss"])):
            ckpt.save(mngr, done, state, meta(done))
            saved = done
        mngr.close()
        raise TrainingInterrupted(
            f"[{stage}] interrupted at step {done}/{total}; checkpoint of step {saved} "
            f"kept in {stage_dir / 'ckpt'}: run the same command again to resume") from None
    pbar.close()
    mngr.close()
    return state


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


def _train_backbone(cfg: Config, data: dict, workdir: Path, retrain: bool,
                    init_from: str | Path | None) -> dict:
    stage_dir = workdir / "backbone"
    linked = backbone_source(workdir)
    if linked is not None:
        raise TrainingError(f"{workdir} takes its backbone from {linked} "
                            "(--backbone-from); it trains experts only")
    done = _begin_stage(cfg, workdir, "backbone", retrain, data.get("class_names"))
    if done is not None:
        return done
    t_start = time.time()
    model = build_model(cfg)
    importing = init_from is not None or (stage_dir / INIT_RECORD).exists()
    variables = init_variables(model, jax.random.PRNGKey(cfg.seed),
                               init_segments=not importing)
    params, stats = split_collections(_subset(variables, BACKBONE_GROUPS))
    if cfg.identity_init and not importing:
        params = identity_kernels(params)
    variables, frozen, init_record = imported_start(
        cfg, model, merge_collections(params, stats), stage_dir, init_from)
    params, stats = split_collections(variables)
    if cfg.whiten_stem and not init_record:
        params = whiten_stem(cfg, params, pipeline.materialize(data["train_images"][:5000]))
    n = len(data["train_images"])
    total = cfg.epochs * (n // cfg.batch_size)
    tx = backbone_optimizer(cfg, n // cfg.batch_size)
    state = backbone_state(cfg, tx, params, stats)
    predict = make_predict_fn(model)
    heldout = (pipeline.concat(data["val_images"], data["calib_images"]),
               np.concatenate([data["val_labels"], data["calib_labels"]]))

    last_heldout: dict = {}   # the final epoch's held-out outputs, for the self-report

    def on_epoch_end(epoch, st):
        # Accuracy on the held-out images (never on test): the per-epoch curve settings
        # are chosen from.
        if not cfg.eval_every_epochs or epoch % cfg.eval_every_epochs or not len(heldout[0]):
            return None
        out = predict_all(model, _eval_variables(st), heldout[0], cfg.eval_batch_size,
                          predict=predict)
        if epoch == cfg.epochs:
            last_heldout["outputs"] = out
        return {f"heldout_{k}": v for k, v in exit_accuracies(out, heldout[1]).items()}

    class_w = (class_balance_weights(data["train_labels"], cfg.num_classes)
               if cfg.class_balance == "loss" else None)
    for line in augmentations_in_use(cfg):
        print(f"[backbone] augmentation {line}")
    full_step = make_backbone_step(model, cfg, tx, total_steps=total, frozen=frozen,
                                   class_w=class_w)
    step_for = None
    if cfg.lowres_size and cfg.lowres_epochs:
        _check_runs_at(model, params, stats, cfg.lowres_size)
        low_step = make_backbone_step(model, cfg, tx, cfg.lowres_size, total_steps=total,
                                      frozen=frozen, class_w=class_w)
        low_steps = round(cfg.lowres_epochs * (n // cfg.batch_size))
        step_for = lambda step: low_step if step < low_steps else full_step
        print(f"[backbone] steps 1-{low_steps} at {cfg.lowres_size}x{cfg.lowres_size}, "
              f"the rest at {cfg.image_size}x{cfg.image_size}")
    state = _run_loop("backbone", workdir, cfg, state, full_step,
                      data["train_images"], data["train_labels"], cfg.batch_size, cfg.epochs,
                      on_epoch_end=on_epoch_end, step_for=step_for,
                      mirror=(lambda e: alternating_flips(cfg.seed, n, e))
                      if cfg.flip == "alternate" else None)
    variables = _eval_variables(state)
    outputs = predict_all(model, variables, data["test_images"], cfg.eval_batch_size, "test",
                          predict=predict)
    result = {"test_accuracy": exit_accuracies(outputs, data["test_labels"]),
              "train_seconds": time.time() - t_start, "steps": total,
              "train_images": n, "data": data.get("identity"),
              "variables_sha256": lineage.variables_digest(variables)}
    if init_record:
        result["init_from"] = init_record
    if len(heldout[0]):
        result["heldout_report"] = heldout_report(model, variables, *heldout,
                                                  data["class_names"], cfg.eval_batch_size,
                                                  predict, last_heldout.get("outputs"))
    ckpt.write_json(stage_dir / "result.json", result)
    ckpt.log_metrics(workdir, {"stage": "backbone", "event": "test",
                               **{k: v for k, v in result.items() if k != "heldout_report"}})
    print("[backbone] test accuracy: " +
          ", ".join(f"{k} {v:.4f}" for k, v in result["test_accuracy"].items()))
    return result


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


def make_expert_optimizer(cfg: Config, total_steps: int) -> optax.GradientTransformation:
    """Adam for both expert kinds, each at its own peak lr: E1 takes a high one (few FT
    examples, see configs.py), the deeper Aux+5b expert collapses to "always FT" at it."""
    def tx(lr):
        return make_optimizer(lr, total_steps, total_steps // 20, cfg.expert_weight_decay, None)
    labels = lambda params: {k: jax.tree_util.tree_map(lambda _: k, v) for k, v in params.items()}
    return optax.multi_transform({"experts": tx(cfg.expert_lr), "aux5b": tx(cfg.aux5b_lr)},
                                 labels)


def _restore_stage(workdir: Path, stage: str, params: Variables, stats: Variables,
                   tx: optax.GradientTransformation, ema: dict | None = None) -> dict:
    """Latest {"params", "stats", "opt"[, "ema"]} of a finished stage (`tx` gives the
    optimizer state structure, `ema` the EMA's when the stage keeps one). `params` and
    `stats` may be abstract (jax.eval_shape): only their structure is used."""
    like = {"params": params, "stats": stats, "opt": jax.eval_shape(tx.init, params)}
    if ema is not None:
        like["ema"] = ema
    mngr = ckpt.manager(workdir / stage)
    try:
        restored = ckpt.restore_latest(mngr, like)
    finally:
        mngr.close()
    if restored is None:
        raise TrainingError(f"{workdir / stage} has no checkpoint")
    return restored[1]


# The fields only the expert stage reads: a workdir whose backbone comes from another
# (`link_backbone`) may differ from that one in these alone.
EXPERT_STAGE_FIELDS = ("name", "seed", "expert_hidden", "expert_inputs", "expert_epochs",
                       "expert_batch_size", "expert_lr", "aux5b_lr", "expert_weight_decay")
BACKBONE_LINK = "backbone_from.json"


def link_backbone(cfg: Config, workdir: str | Path, source: str | Path) -> None:
    """Makes a new workdir take its backbone from `source` (a workdir with a finished
    backbone stage, or a release folder) instead of training one, so that experts of
    another kind (e.g. `expert_inputs`, an ablation) are trained on the very same frozen
    backbone and held-out split. The configs may differ only in EXPERT_STAGE_FIELDS. The
    link is stored relative to the workdir, so the two can move together."""
    workdir, source = Path(workdir), Path(source)
    if (workdir / "backbone").exists():
        raise TrainingError(f"{workdir} has a backbone stage of its own; take a backbone "
                            "from another workdir only into a new workdir")
    if source.resolve() == workdir.resolve():
        raise TrainingError("a workdir cannot take its backbone from itself")
    ckpt.load_config(source)   # refuses a folder that is not a workdir or release
    if not release.is_release(source) and _stage_done(source / "backbone") is None:
        raise TrainingError(f"{source} has no finished backbone stage")
    diff = ckpt.config_diff(source, cfg, ignore=EXPERT_STAGE_FIELDS)
    if diff:
        raise TrainingError(f"the backbone of {source} was trained with another config "
                            f"({diff}); only the expert stage's fields may differ: "
                            + ", ".join(EXPERT_STAGE_FIELDS))
    rel = os.path.relpath(source.resolve(), workdir.resolve())
    linked = backbone_source(workdir)
    if linked is not None and linked != source.resolve():
        raise TrainingError(f"{workdir} already takes its backbone from {linked}")
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(workdir / BACKBONE_LINK, {"path": rel})


def backbone_source(workdir: str | Path) -> Path | None:
    """Where a workdir's backbone comes from when `link_backbone` linked it, else None."""
    link = Path(workdir) / BACKBONE_LINK
    if not link.exists():
        return None
    return (Path(workdir).resolve() / json.loads(link.read_text())["path"]).resolve()


def check_data_lineage(workdir: str | Path, data: dict, doing: str) -> None:
    """Refuses data other than what the workdir's backbone trained on (see lineage.py)."""
    workdir = Path(workdir)
    lineage.check_data((backbone_source(workdir) or workdir) / "backbone",
                       data.get("identity"), doing)


def load_backbone(workdir: str | Path, cfg: Config) -> tuple[Model, Variables]:
    """The finished backbone of a workdir (segments and exits, eval-ready), or of the
    workdir or release it is linked to."""
    workdir = Path(workdir)
    source = backbone_source(workdir)
    if source is not None:
        if not source.exists():
            raise TrainingError(f"{workdir} takes its backbone from {source}, which is gone")
        if release.is_release(source):
            return build_model(cfg), _subset(release.load_release(source)[1], BACKBONE_GROUPS)
        return load_backbone(source, cfg)
    if _stage_done(workdir / "backbone") is None:
        raise TrainingError(f"{workdir} has no finished backbone stage; "
                            "run `python train.py --stage backbone` first")
    model = build_model(cfg)
    variables = abstract_variables(model, cfg.seed)
    params, stats = split_collections(_subset(variables, BACKBONE_GROUPS))
    tx = backbone_optimizer(cfg, 10)
    st = _restore_stage(workdir, "backbone", params, stats, tx,
                        ema=jax.eval_shape(init_ema, params, stats) if cfg.ema_decay > 0
                        else None)
    return model, _eval_variables(st)


def _eval_variables(state: dict) -> Variables:
    """The variables a backbone state is evaluated with: its EMA when it keeps one."""
    src = state.get("ema", state)
    return merge_collections(src["params"], src["stats"])


# ----------------------------------------------------------------------------- expert

def class_weights(is_ft: np.ndarray) -> np.ndarray:
    """Balanced weights (FT, Other) from the FT rate: both classes weigh half of the loss."""
    p_ft = float(np.clip(np.mean(is_ft), 1e-3, 1 - 1e-3))
    return np.array([0.5 / p_ft, 0.5 / (1 - p_ft)], np.float32)


def balanced_expert_loss(e_logits: jax.Array, target: jax.Array,
                         class_w: jax.Array) -> jax.Array:
    """Class-weighted cross-entropy of expert logits against {FT, Other} targets;
    `class_w` is (FT, Other) as `class_weights` gives."""
    w = class_w[target].astype(e_logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(e_logits, target)
    return jnp.sum(w * ce) / jnp.sum(w)


def make_expert_step(model: Model, cfg: Config, tx: optax.GradientTransformation,
                     backbone: Variables):
    m = model.num_exits
    b_params, b_stats = split_collections(backbone)

    def loss_fn(params, stats, x, y, class_w):
        logits, feats, _ = backbone_forward(model, b_params, b_stats, x, train=False)
        preds = [l.argmax(-1) for l in logits]
        full_params = {**b_params, **params}
        full_stats = {**b_stats, **stats}
        new_stats = {g: {} for g in EXPERT_GROUPS}
        loss, metrics = 0.0, {}
        for i in range(m - 1):
            right_later = jnp.zeros_like(y, dtype=bool)
            for p in preds[i + 1:]:
                right_later |= p == y
            is_ft = (preds[i] != y) & right_later
            target = jnp.where(is_ft, FT, OTHER)
            for kind in EXPERT_GROUPS:
                e_logits, upd = expert_forward(model, full_params, full_stats, kind, i,
                                               feats[i], logits[i], train=True)
                new_stats[kind][f"E{i + 1}"] = upd
                loss = loss + balanced_expert_loss(e_logits, target, class_w[i])
                metrics[f"acc_{kind}_E{i + 1}"] = jnp.mean(e_logits.argmax(-1) == target)
            metrics[f"ft_rate_E{i + 1}"] = jnp.mean(is_ft)
        return loss, (new_stats, metrics)

    @jax.jit
    def step(state, images, labels, rng, class_w):
        x = normalize(augment(rng, images, cfg.pad_crop, flip=cfg.flip != "none",
                              pad_mode=cfg.pad_mode), cfg.input_norm)
        (loss, (new_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["stats"], x, labels, class_w)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "stats": new_stats, "opt": opt}, {"loss": loss, **metrics}

    return step


# Below this many FT examples an expert has next to nothing to learn "go deeper" from.
MIN_FT_EXAMPLES = 30


def _warn_leak(heldout_rate: list[float], test_rate: list[float], n_test: int) -> None:
    """Warns when the held-out FT rate is far below the test one: the backbone has seen
    near-copies of the held-out images (a random split of video frames, several shots of
    one object), so they look easy and the expert learns that everything may leave early."""
    for i, (h, t) in enumerate(zip(heldout_rate, test_rate)):
        if t * n_test >= MIN_FT_EXAMPLES and h < 0.5 * t:
            print(f"warning: the FT rate of E{i + 1} is {h:.2%} on the held-out images but "
                  f"{t:.2%} on test: the held-out images look leaked (near-duplicates of "
                  f"training images). Hold out whole groups (--set group_pattern=REGEX) or "
                  f"give held-out images of your own (--val-dir)", file=sys.stderr)


def train_expert(cfg: Config, data: dict, workdir: str | Path, retrain: bool = False,
                 backbone_from: str | Path | None = None) -> dict:
    """The expert stage on the workdir's frozen backbone, or, with `backbone_from`, on the
    backbone of another workdir or release (see `link_backbone`). One trainer per
    workdir."""
    if backbone_from is not None:   # first: a refused link leaves nothing behind
        link_backbone(cfg, workdir, backbone_from)
    with ckpt.workdir_lock(workdir):
        return _train_expert(cfg, data, Path(workdir), retrain)


def _train_expert(cfg: Config, data: dict, workdir: Path, retrain: bool) -> dict:
    stage_dir = workdir / "expert"
    done = _begin_stage(cfg, workdir, "expert", retrain, data.get("class_names"))
    if done is not None:
        return done
    t_start = time.time()
    model, backbone = load_backbone(workdir, cfg)
    check_data_lineage(workdir, data, "training the experts")
    backbone_sha = lineage.variables_digest(backbone)
    lineage.check_expert_start(stage_dir, backbone_sha, data.get("identity"))
    if model.num_exits < 2:
        raise TrainingError("the config has no branch point, so there is no expert to train")
    # Class balance from the un-augmented held-out images: FT is the rare class.
    val_out = predict_all(model, backbone, data["val_images"], cfg.eval_batch_size, "FT labels")
    preds = [o.argmax(-1) for o in val_out["exits"]]
    is_ft = [ft_labels(preds, data["val_labels"], i) for i in range(model.num_exits - 1)]
    class_w = np.stack([class_weights(ft) for ft in is_ft])
    ft_counts = [int(ft.sum()) for ft in is_ft]
    print(f"[expert] FT examples (wrong at the expert's exit, right at a later one) per "
          f"expert, of {len(data['val_labels'])} held-out images: {ft_counts}")
    for i, c in enumerate(ft_counts):
        if c < MIN_FT_EXAMPLES:
            print(f"warning: E{i + 1} has only {c} FT examples to learn from (fewer than "
                  f"{MIN_FT_EXAMPLES}); its scores will be unreliable. Hold out more images "
                  f"(--set val_size=..., or --val-dir)", file=sys.stderr)

    variables = init_variables(model, jax.random.PRNGKey(cfg.seed + 1), init_segments=False)
    params, stats = split_collections(_subset(variables, EXPERT_GROUPS))
    n = len(data["val_images"])
    bs = min(cfg.expert_batch_size, n)
    total = cfg.expert_epochs * (n // bs)
    tx = make_expert_optimizer(cfg, total)
    state = {"params": params, "stats": stats, "opt": tx.init(params)}
    step_fn = make_expert_step(model, cfg, tx, backbone)
    state = _run_loop("expert", workdir, cfg, state, step_fn, data["val_images"],
                      data["val_labels"], bs, cfg.expert_epochs,
                      extra_args=(jnp.asarray(class_w),))
    full = {**backbone, **merge_collections(state["params"], state["stats"])}
    outputs = predict_all(model, full, data["test_images"], cfg.eval_batch_size, "test")
    aucs = expert_aucs(outputs, data["test_labels"])
    heldout_rate = [c / len(data["val_labels"]) for c in ft_counts]
    _warn_leak(heldout_rate, [aucs[f"ft_rate_E{i + 1}"] for i in range(len(ft_counts))],
               len(data["test_labels"]))
    # The calibration split is held out of both stages: is the expert worth serving?
    calib_out = predict_all(model, full, data["calib_images"], cfg.eval_batch_size)
    versus = diagnostics.expert_vs_max_softmax(calib_out, data["calib_labels"])
    for row in versus:
        warning = diagnostics.expert_warning(row)
        if warning:
            row["warning"] = warning
            print(f"warning: {warning}", file=sys.stderr)
    result = {"test_accuracy": exit_accuracies(outputs, data["test_labels"]),
              "calib_expert_vs_max_softmax": versus,
              "test_auc_other_vs_ft": aucs, "heldout_ft_examples": ft_counts,
              "heldout_ft_rate": heldout_rate,
              "train_seconds": time.time() - t_start, "steps": total, "train_images": n,
              "backbone_sha256": backbone_sha, "data": data.get("identity")}
    ckpt.write_json(stage_dir / "result.json", result)
    ckpt.log_metrics(workdir, {"stage": "expert", "event": "test", **result})
    print("[expert] test AUC (Other vs FT): " +
          ", ".join(f"{k} {v:.4f}" for k, v in result["test_auc_other_vs_ft"].items()))
    return result


def load_trained(workdir: str | Path) -> tuple[Model, Variables]:
    """Backbone and experts of a finished workdir (or a release folder, see release.py),
    for evaluation and the API."""
    workdir = Path(workdir)
    if release.is_release(workdir):
        return release.load_release(workdir)
    cfg = ckpt.load_config(workdir)
    model, backbone = load_backbone(workdir, cfg)
    lineage.check_experts_match(workdir, backbone)
    if _stage_done(workdir / "expert") is None:
        raise TrainingError(f"{workdir} has no finished expert stage; "
                            "run `python train.py --stage expert` first")
    variables = abstract_variables(model, cfg.seed + 1)
    params, stats = split_collections(_subset(variables, EXPERT_GROUPS))
    st = _restore_stage(workdir, "expert", params, stats, make_expert_optimizer(cfg, 10))
    return model, {**backbone, **merge_collections(st["params"], st["stats"])}
