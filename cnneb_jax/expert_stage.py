"""The expert stage: backbone and exits frozen, the proposed experts E_i and the
"Auxiliary+5b" experts learn FT vs Other (wrong at their exit, right at a later one) on
held-out images the backbone never trained on. It warns where the experts have little to
learn from, where the held-out images look leaked, and where O1's max softmax ranks the
held-out images better than E1 (diagnostics.py); it ends by writing
`expert/result.json`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cnneb_jax import checkpoints as ckpt
from cnneb_jax import diagnostics, lineage
from cnneb_jax.augment import augment, normalize
from cnneb_jax.configs import Config
from cnneb_jax.diagnostics import expert_aucs
from cnneb_jax.evaluation import exit_accuracies, make_predict_fn, predict_all
from cnneb_jax.heads import FT, OTHER
from cnneb_jax.loop import StageSpec, run_stage
from cnneb_jax.metrics import ft_labels
from cnneb_jax.model import (EXPERT_GROUPS, Model, Variables, backbone_forward,
                             expert_forward, init_variables, merge_collections,
                             split_collections)
from cnneb_jax.optim import make_expert_optimizer, train_state
from cnneb_jax.workdir import (TrainingError, begin_stage, check_data_lineage,
                               link_backbone, load_backbone, subset)


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


def ft_targets(logits: list, labels: jax.Array) -> list[jax.Array]:
    """Per branch point i: FT (O_i wrong, a later exit right) or Other, from exit logits."""
    preds = [l.argmax(-1) for l in logits]
    return [jnp.where(ft_labels(preds, labels, i) == 1, FT, OTHER)
            for i in range(len(logits) - 1)]


def _experts_loss(model: Model, params, stats, backbone, feats, logits, targets, class_w,
                  kinds: tuple[str, ...] = EXPERT_GROUPS):
    """The balanced loss of every expert of `kinds` at every branch point, from the frozen
    backbone's features and exit logits there; returns (loss, (their new statistics,
    metrics)). The other kinds' statistics are returned unchanged."""
    b_params, b_stats = split_collections(backbone)
    full_params, full_stats = {**b_params, **params}, {**b_stats, **stats}
    new_stats = {g: dict(stats.get(g, {})) for g in EXPERT_GROUPS}
    loss, metrics = 0.0, {}
    for i, target in enumerate(targets):
        for kind in kinds:
            e_logits, upd = expert_forward(model, full_params, full_stats, kind, i,
                                           feats[i], logits[i], train=True)
            new_stats[kind][f"E{i + 1}"] = upd
            loss = loss + balanced_expert_loss(e_logits, target, class_w[i])
            metrics[f"acc_{kind}_E{i + 1}"] = jnp.mean(e_logits.argmax(-1) == target)
        metrics[f"ft_rate_E{i + 1}"] = jnp.mean(target == FT)
    return loss, (new_stats, metrics)


def _apply_step(tx, state, loss_fn, *args):
    (loss, (new_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state["stats"], *args)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "stats": new_stats, "opt": opt}, {"loss": loss, **metrics}


def _augmented(cfg: Config, rng: jax.Array, images: jax.Array) -> jax.Array:
    return normalize(augment(rng, images, cfg.pad_crop, flip=cfg.flip != "none",
                             pad_mode=cfg.pad_mode), cfg.input_norm)


def make_expert_step(model: Model, cfg: Config, tx: optax.GradientTransformation,
                     kinds: tuple[str, ...] = EXPERT_GROUPS):
    """The jitted expert train step of the experts of `kinds`: (state, images, labels, rng,
    class_w, backbone). The frozen backbone is an argument, not a constant of the program:
    the program stays small, and compiles once for every backbone of a config (the
    persistent cache then serves other workdirs, seeds and resumed runs)."""

    def loss_fn(params, stats, x, y, class_w, backbone):
        b_params, b_stats = split_collections(backbone)
        logits, feats, _ = backbone_forward(model, b_params, b_stats, x, train=False)
        return _experts_loss(model, params, stats, backbone, feats, logits,
                             ft_targets(logits, y), class_w, kinds)

    @jax.jit
    def step(state, images, labels, rng, class_w, backbone):
        return _apply_step(tx, state, loss_fn, _augmented(cfg, rng, images), labels,
                           class_w, backbone)

    return step


def cache_views(model: Model, cfg: Config, backbone: Variables, images: np.ndarray,
                labels: np.ndarray, views: int, batch_size: int) -> dict:
    """`views` augmented views of `images` through the frozen backbone, once: the
    branch-point features (float16, to halve their memory), every exit's logits and the FT
    targets, as numpy arrays whose row v * N + j is view v of image j. Seeded by the
    config's seed alone, so a resumed run rebuilds the same views."""
    m = model.num_exits

    @jax.jit
    def forward(backbone, x, rng):
        b_params, b_stats = split_collections(backbone)
        logits, feats, _ = backbone_forward(model, b_params, b_stats,
                                            _augmented(cfg, rng, x), train=False)
        return [f.astype(jnp.float16) for f in feats[:m - 1]], logits

    key = jax.random.PRNGKey(cfg.seed + 3)
    parts = []
    for v in range(views):
        for b, start in enumerate(range(0, len(images), batch_size)):
            rng = jax.random.fold_in(jax.random.fold_in(key, v), b)
            parts.append(jax.device_get(forward(backbone, images[start:start + batch_size],
                                                rng)))
    feats = [np.concatenate([p[0][i] for p in parts]) for i in range(m - 1)]
    logits = [np.concatenate([p[1][i] for p in parts]) for i in range(m)]
    targets = [np.asarray(t) for t in ft_targets(logits, np.tile(labels, views))]
    return {"feats": feats, "logits": logits, "targets": targets}


def make_cached_expert_step(model: Model, tx: optax.GradientTransformation,
                            kinds: tuple[str, ...] = EXPERT_GROUPS):
    """The jitted train step of the experts of `kinds` on cached views (`cache_views`):
    (state, rows, labels, rng, class_w, backbone, cache); `rows` index the cache, `labels`
    and `rng` go unused (the views are augmented already, their FT targets computed)."""

    def loss_fn(params, stats, feats, logits, targets, class_w, backbone):
        return _experts_loss(model, params, stats, backbone, feats, logits, targets, class_w,
                             kinds)

    @jax.jit
    def step(state, rows, labels, rng, class_w, backbone, cache):
        take = lambda xs, dtype=None: [x[rows] if dtype is None else x[rows].astype(dtype)
                                       for x in xs]
        return _apply_step(tx, state, loss_fn, take(cache["feats"], jnp.float32),
                           take(cache["logits"]), take(cache["targets"]), class_w, backbone)

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


def ft_class_weights(model: Model, backbone: Variables, images, labels: np.ndarray,
                     batch_size: int) -> tuple[np.ndarray, list[int]]:
    """Each expert's (FT, Other) loss weights, from the un-augmented held-out images (FT is
    the rare class), and its FT count; warns where an expert has too few to learn from."""
    out = predict_all(model, backbone, images, batch_size, "FT labels")
    preds = [o.argmax(-1) for o in out["exits"]]
    is_ft = [ft_labels(preds, labels, i) for i in range(model.num_exits - 1)]
    ft_counts = [int(ft.sum()) for ft in is_ft]
    print(f"[expert] FT examples (wrong at the expert's exit, right at a later one) per "
          f"expert, of {len(labels)} held-out images: {ft_counts}")
    for i, c in enumerate(ft_counts):
        if c < MIN_FT_EXAMPLES:
            print(f"warning: E{i + 1} has only {c} FT examples to learn from (fewer than "
                  f"{MIN_FT_EXAMPLES}); its scores will be unreliable. Hold out more images "
                  f"(--set val_size=..., or --val-dir)", file=sys.stderr)
    return np.stack([class_weights(ft) for ft in is_ft]), ft_counts


def _check_against_rule(model: Model, variables: Variables, data: dict,
                        batch_size: int, predict=None) -> list[dict]:
    """Does E1 rank the held-out images (the expert split, un-augmented) better than O1's
    max softmax, i.e. is the expert worth serving? Warns where it is not. The expert
    trained on these images, so the comparison favours it: a warning is safe to act on.
    The calibration split is not read: it certifies the operating point, and a rule chosen
    on it would no longer be fixed independently of it (Learn-then-Test's assumption)."""
    heldout_out = predict_all(model, variables, data["val_images"], batch_size,
                              predict=predict)
    versus = diagnostics.expert_vs_max_softmax(heldout_out, data["val_labels"])
    for row in versus:
        warning = diagnostics.expert_warning(row)
        if warning:
            row["warning"] = warning
            print(f"warning: {warning}", file=sys.stderr)
    return versus


def expert_epochs(cfg: Config) -> dict[str, int]:
    """Each expert kind's epochs: E1's `expert_epochs`, Aux+5b's `aux5b_epochs` (0: the
    same)."""
    return {"experts": cfg.expert_epochs, "aux5b": cfg.aux5b_epochs or cfg.expert_epochs}


def _stage_spec(cfg: Config, model: Model, backbone: Variables, data: dict,
                class_w: np.ndarray) -> tuple[StageSpec, optax.GradientTransformation]:
    """What the expert stage trains on (fresh augmentations of the held-out images, or
    `expert_views` cached views of them) and with (each kind's budget and schedule)."""
    n = len(data["val_images"])
    bs = min(cfg.expert_batch_size, n)
    views = cfg.expert_views
    epochs = expert_epochs(cfg)
    # With cached views one loop epoch reads every view once: an expert epoch is 1/views
    # of it.
    total = {kind: e * (views * n // bs) // views if views else e * (n // bs)
             for kind, e in epochs.items()}
    tx = make_expert_optimizer(cfg, total)
    step_args: tuple = (jnp.asarray(class_w), backbone)
    if views:
        print(f"[expert] {views} augmented views of {n} held-out images through the backbone")
        cache = cache_views(model, cfg, backbone, data["val_images"], data["val_labels"],
                            views, cfg.eval_batch_size)
        make_step = lambda kinds: make_cached_expert_step(model, tx, kinds)
        images, labels = np.arange(views * n), np.tile(data["val_labels"], views)
        loop_epochs, step_args = max(epochs.values()) // views, step_args + (cache,)
    else:
        make_step = lambda kinds: make_expert_step(model, cfg, tx, kinds)
        images, labels = data["val_images"], data["val_labels"]
        loop_epochs = max(epochs.values())
    steps = ((0, make_step(EXPERT_GROUPS)),)
    if len(set(total.values())) > 1:  # the longer budget goes on alone
        longer = max(total, key=total.get)
        steps += ((min(total.values()), make_step((longer,))),)
    return StageSpec("expert", images, labels, bs, loop_epochs, steps, step_args=step_args), tx


def _train_expert(cfg: Config, data: dict, workdir: Path, retrain: bool) -> dict:
    stage_dir = workdir / "expert"
    done = begin_stage(cfg, workdir, "expert", retrain, data.get("class_names"))
    if done is not None:
        return done
    t_start = time.time()
    model, backbone = load_backbone(workdir, cfg)
    check_data_lineage(workdir, data, "training the experts")
    backbone_sha = lineage.variables_digest(backbone)
    lineage.check_expert_start(stage_dir, backbone_sha, data.get("identity"))
    if model.num_exits < 2:
        raise TrainingError("the config has no branch point, so there is no expert to train")
    class_w, ft_counts = ft_class_weights(model, backbone, data["val_images"],
                                          data["val_labels"], cfg.eval_batch_size)
    variables = init_variables(model, jax.random.PRNGKey(cfg.seed + 1), init_segments=False)
    params, stats = split_collections(subset(variables, EXPERT_GROUPS))
    spec, tx = _stage_spec(cfg, model, backbone, data, class_w)
    state, _ = run_stage(spec, workdir, cfg, train_state(tx, params, stats))
    full = {**backbone, **merge_collections(state["params"], state["stats"])}
    predict = make_predict_fn(model)   # traced once for the test and held-out splits
    outputs = predict_all(model, full, data["test_images"], cfg.eval_batch_size, "test",
                          predict=predict)
    aucs = expert_aucs(outputs, data["test_labels"])
    heldout_rate = [c / len(data["val_labels"]) for c in ft_counts]
    _warn_leak(heldout_rate, [aucs[f"ft_rate_E{i + 1}"] for i in range(len(ft_counts))],
               len(data["test_labels"]))
    result = {"test_accuracy": exit_accuracies(outputs, data["test_labels"]),
              "heldout_expert_vs_max_softmax": _check_against_rule(model, full, data,
                                                                 cfg.eval_batch_size, predict),
              "test_auc_other_vs_ft": aucs, "heldout_ft_examples": ft_counts,
              "heldout_ft_rate": heldout_rate, "train_seconds": time.time() - t_start,
              "steps": spec.epochs * spec.steps_per_epoch, "train_images": len(data["val_images"]),
              "backbone_sha256": backbone_sha, "data": data.get("identity")}
    ckpt.write_json(stage_dir / "result.json", result)
    ckpt.log_metrics(workdir, {"stage": "expert", "event": "test", **result})
    print("[expert] test AUC (Other vs FT): " +
          ", ".join(f"{k} {v:.4f}" for k, v in result["test_auc_other_vs_ft"].items()))
    return result
