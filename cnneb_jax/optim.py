"""Optimizers and the training state they update: the backbone's SGD+Nesterov and the
experts' Adam (both with linear warm-up and decay), frozen parts, and the weight averages
(EMA, airbench's lookahead) a state may keep.

A training state is {"params", "stats", "opt"[, "ema"]}; `eval_variables` picks what a
state is evaluated and served with. Nothing here is needed to read a trained workdir for
inference (workdir.py restores the evaluation variables alone).
"""

from __future__ import annotations

from typing import Any, Collection

import jax
import jax.numpy as jnp
import optax

from cnneb_jax.configs import Config
from cnneb_jax.model import Variables, is_frozen, merge_collections


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


def make_expert_optimizer(cfg: Config, total_steps: dict[str, int]) -> optax.GradientTransformation:
    """Adam for both expert kinds, each at its own peak lr and over its own number of steps
    (`total_steps`, by kind): E1 takes a high lr (few FT examples, see configs.py), the
    deeper Aux+5b expert collapses to "always FT" at it. After its last step a kind's lr
    is 0, so it stays where its budget ended."""
    def tx(lr, total):
        return make_optimizer(lr, total, total // 20, cfg.expert_weight_decay, None)
    labels = lambda params: {k: jax.tree_util.tree_map(lambda _: k, v) for k, v in params.items()}
    return optax.multi_transform({"experts": tx(cfg.expert_lr, total_steps["experts"]),
                                  "aux5b": tx(cfg.aux5b_lr, total_steps["aux5b"])}, labels)


def freeze_updates(updates: Variables, frozen: Collection[str]) -> Variables:
    """`updates` with the frozen parts' set to zero (weight decay would move them)."""
    return {group: {name: (jax.tree_util.tree_map(jnp.zeros_like, u)
                           if is_frozen(group, name, frozen) else u)
                    for name, u in parts.items()}
            for group, parts in updates.items()}


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


def train_state(tx: optax.GradientTransformation, params: Variables, stats: Variables,
                ema: bool = False) -> dict:
    """A stage's training state: parameters, BatchNorm statistics, optimizer state and,
    with `ema`, the weight average (`ema_decay` > 0)."""
    # One program for the whole optimizer state: eagerly, each leaf's zeros would be an
    # op of its own, compiled per shape on a cold start.
    state = {"params": params, "stats": stats, "opt": jax.jit(tx.init)(params)}
    if ema:
        state["ema"] = init_ema(params, stats)
    return state


def eval_variables(state: dict) -> Variables:
    """The variables a training state is evaluated with: its EMA when it keeps one."""
    src = state.get("ema", state)
    return merge_collections(src["params"], src["stats"])
