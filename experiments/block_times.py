"""Eval-mode time, XLA FLOPs and GFLOP/s of every Inception v3 block, one jit per block.

    python experiments/block_times.py --config cifar --batch 256
    python experiments/block_times.py --config cifar --batch 128 --train   # forward+backward

Shows where the early-exit prefix (stem -> Mixed_5b) is less efficient per FLOP than the
deep layers on this machine: the reason measured time sits above the FLOPs prediction
when most images leave at O1. Random weights: timing does not depend on their values.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from cnneb_jax.configs import BLOCKS, CONFIGS, get_config
from cnneb_jax.timing import median_seconds
from cnneb_jax.segments import Segment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="cifar", choices=sorted(CONFIGS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--train", action="store_true",
                   help="time each block's train-mode forward+backward (gradients of the "
                        "parameters and the input) instead of the eval forward")
    args = p.parse_args()
    cfg = get_config(args.config)
    cfg = cfg.replace(num_classes=cfg.num_classes or 10)  # CIFAR-10 unless set
    h = jnp.asarray(np.random.default_rng(0).standard_normal(
        (args.batch, cfg.image_size, cfg.image_size, 3), np.float32))
    prev, total_ms, total_flops = None, 0.0, 0.0
    print(f"{'block':16s} {'ms':>8s} {'GFLOP':>7s} {'GFLOP/s':>8s}  output")
    for name in BLOCKS:
        seg = Segment(cfg, prev, name)
        v = seg.init(jax.random.PRNGKey(0), h)
        f = jax.jit(lambda v, h, seg=seg: seg.apply(v, h))
        if args.train:
            def loss(prm, h, seg=seg, v=v):
                y, _ = seg.apply({**v, "params": prm}, h, True, mutable=["batch_stats"])
                return jnp.sum(y * y)
            g = jax.jit(jax.grad(loss, argnums=(0, 1)))
            v = {"params": {}, **v}  # the pools have no parameters
            timed = lambda v, h, g=g: g(v["params"], h)
        else:
            timed = f
        jax.block_until_ready(timed(v, h))  # compile
        ms = 1e3 * median_seconds(lambda: jax.block_until_ready(timed(v, h)), 7)
        cost = (g.lower(v["params"], h) if args.train else f.lower(v, h)).compile().cost_analysis()
        flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
        h = f(v, h)
        total_ms, total_flops = total_ms + ms, total_flops + flops
        print(f"{name:16s} {ms:8.2f} {flops / 1e9:7.2f} {flops / 1e6 / ms:8.1f}  {tuple(h.shape)}")
        prev = name
    print(f"{'all blocks':16s} {total_ms:8.2f} {total_flops / 1e9:7.2f} "
          f"{total_flops / 1e6 / total_ms:8.1f}")


if __name__ == "__main__":
    main()
