"""The expert fit of `expert_cache.train_expert` (one call per epoch, the step scanned over
the epoch's batches, the cache on the device) against a call per step (the batch gathered
in numpy each step, as it ran until session 30): the same parameters bit for bit, and the
time of each.

    python experiments/expert_fit_speed.py --epochs 64

Reads the feature cache that `expert_budget.py` wrote (`--cache`), trains E1 (softmax) on
folds 2 and 3 of its held-out images and scores fold 1. Nothing else should run beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import expert_budget as eb  # noqa: E402  (beside this script)
import expert_cache as ec  # noqa: E402
from cnneb_jax.optim import make_optimizer  # noqa: E402


def per_step(model, cache, lr, epochs, batch_size, seed, weight_decay, class_w, init, images):
    """The fit as it ran before: a jitted call per step on a batch gathered in numpy."""
    feats, logits, is_ft = cache["feats"][0], cache["logits"][0], cache["is_ft"][0]
    views, n_all = cache["views"], len(cache["is_ft"][0]) // cache["views"]
    n = len(images)
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch
    tx = make_optimizer(lr, total, total // 20, weight_decay, None)
    state = {"params": init["params"], "stats": init.get("batch_stats", {}),
             "opt": tx.init(init["params"])}
    step = ec._step_fn(model, "experts", 0, tx)
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)[:steps_per_epoch * batch_size]
        base = (epoch % views) * n_all
        for rows in order.reshape(steps_per_epoch, batch_size):
            r = base + images[rows]
            state, _ = step(state, feats[r], logits[r], is_ft[r], jnp.asarray(class_w))
    return {"params": state["params"], "batch_stats": state["stats"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="pretrained/cifar")
    p.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    p.add_argument("--cache", default="runs/expert_budget/features-07d486bc03ffc200.npz")
    p.add_argument("--epochs", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.27)
    args = p.parse_args()
    cfg, _, model, _, _, _ = ec.load_source(args.workdir, args.data_dir)
    z = np.load(args.cache)
    train = {"feats": [z["train|feats|0"]], "logits": [z["train|logits|0"]],
             "is_ft": [z["train|is_ft|0"]], "views": int(z["train|views|0"])}
    is_ft = z["val|is_ft|0"]
    folds = eb.folds_of(is_ft, 3, cfg.seed)
    rest = np.sort(np.concatenate(folds[1:]))
    w = ec.class_weights(is_ft[rest])
    bs = cfg.expert_batch_size
    init = ec.init_expert(model, "experts", 0, 0, train["feats"][0].shape)
    fits = {"one call per epoch": lambda e: ec.train_expert(
                model, train, "experts", 0, args.lr, e, bs, 0, cfg.expert_weight_decay,
                class_w=w, init=init, images=rest),
            "one call per step": lambda e: per_step(
                model, train, args.lr, e, bs, 0, cfg.expert_weight_decay, w, init, rest)}
    out = {}
    for name, fit in fits.items():
        fit(1)  # compiles the step (each fit compiles again; its share shrinks with epochs)
        t = time.perf_counter()
        out[name] = fit(args.epochs)
        dt = time.perf_counter() - t
        print(f"{name}: {args.epochs} epochs in {dt:.1f} s, "
              f"{dt / (args.epochs * (len(rest) // bs)) * 1e3:.1f} ms a step", flush=True)
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), *out.values())
    print("parameters bit for bit the same:", all(jax.tree_util.tree_leaves(same)))


if __name__ == "__main__":
    main()
