"""Where a backbone train step's time goes: eval forward, train-mode forward (batch
statistics), forward+backward, and the whole step (augmentation, optimizer, EMA), each jitted
on its own and timed in interleaved rounds in one run.

    python experiments/step_breakdown.py --config cifar --batch 128 --rounds 5

A train step costs about 3 forwards in FLOPs; the ratios printed show how far above that the
CPU lands and which part holds the excess. Random weights and images.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax

from cnneb_jax.configs import CONFIGS, get_config
from cnneb_jax.augment import normalize
from cnneb_jax.model import (BACKBONE_GROUPS, abstract_variables, backbone_forward, build_model,
                             split_collections)
from cnneb_jax.optim import backbone_optimizer, train_state
from cnneb_jax.backbone_stage import make_backbone_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cifar", choices=sorted(CONFIGS))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="calls per part per round")
    args = p.parse_args()
    cfg = get_config(args.config, dict(kv.split("=", 1) for kv in args.set))
    cfg = cfg.replace(num_classes=cfg.num_classes or 10)  # CIFAR-10 unless set
    cfg = cfg.replace(batch_size=args.batch)
    model = build_model(cfg)
    leaves, tree = jax.tree_util.tree_flatten(abstract_variables(model))
    rng = np.random.default_rng(0)
    leaves = [np.asarray(rng.standard_normal(l.shape) * 0.05, l.dtype) for l in leaves]
    params, stats = split_collections(
        {g: jax.tree_util.tree_unflatten(tree, leaves)[g] for g in BACKBONE_GROUPS})
    images = rng.integers(0, 256, (args.batch, cfg.image_size, cfg.image_size, 3), np.uint8)
    labels = rng.integers(0, cfg.num_classes, args.batch).astype(np.int32)
    x = normalize(images)

    def loss(prm, train):
        logits, _, _ = backbone_forward(model, prm, stats, x, train, jax.random.PRNGKey(0))
        onehot = jax.nn.one_hot(labels, cfg.num_classes)
        return sum(optax.softmax_cross_entropy(l, onehot).mean() for l in logits)

    eval_fwd = jax.jit(lambda prm: loss(prm, False))
    train_fwd = jax.jit(lambda prm: loss(prm, True))
    fwd_bwd = jax.jit(jax.grad(lambda prm: loss(prm, True)))
    tx = backbone_optimizer(cfg, 100)
    state = train_state(tx, params, stats, ema=cfg.ema_decay > 0)
    step = make_backbone_step(model, cfg, tx)
    holder = {"state": state}

    def full(_):
        holder["state"], m = step(holder["state"], images, labels, jax.random.PRNGKey(0))
        return m["loss"]

    parts = {"eval forward": eval_fwd, "train forward": train_fwd,
             "forward+backward": fwd_bwd, "whole step": full}
    for f in parts.values():
        jax.block_until_ready(f(params))
    times = {k: [] for k in parts}
    for _ in range(args.rounds):
        for k, f in parts.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                out = f(params)
            jax.block_until_ready(out)
            times[k].append((time.perf_counter() - t) / args.steps)
    base = np.median(times["eval forward"])
    print(f"config {cfg.name}, batch {args.batch}, {args.rounds} rounds x {args.steps} calls")
    print("| part | ms / batch (median) | spread | x eval forward | images/s |")
    print("|---|---:|---:|---:|---:|")
    for k, ts in times.items():
        med = np.median(ts)
        print(f"| {k} | {1e3 * med:.1f} | {1e3 * min(ts):.1f}-{1e3 * max(ts):.1f} | "
              f"{med / base:.2f} | {args.batch / med:.0f} |")


if __name__ == "__main__":
    main()
