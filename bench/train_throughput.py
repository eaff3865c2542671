"""Backbone training images/s of config variants, measured side by side in one run.

    python bench/train_throughput.py                       # the cifar config alone
    python bench/train_throughput.py base "ema:ema_decay=0.99" "w30:width=0.3"

Each variant is `name` or `name:key=value,key=value` (config fields, as `--set` takes them).
Every variant's real train step (augmentation, forward, backward, optimizer, EMA) is compiled
first; then rounds run `--steps` steps of each variant in turn (ABAB...), so that a machine
whose speed drifts affects all of them alike. Prints the median images/s of each variant,
its spread over rounds, and its ratio to the first variant with the spread of the per-round
ratios. Random images: the step's cost does not depend on the pixels. Steps run at
image_size; a variant that sets `lowres_size` (e.g. "r24:lowres_size=24") times the
progressive-resizing step at that size.
"""

from __future__ import annotations

import time

import jax
import numpy as np

import benchlib
from cnneb_jax.backbone_stage import make_backbone_step
from cnneb_jax.model import BACKBONE_GROUPS, build_model, split_collections
from cnneb_jax.optim import backbone_optimizer, train_state


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    overrides = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return name, overrides


def make_runner(config: str, overrides: dict[str, str], steps_per_epoch: int):
    """A compiled train step of the variant and its state; returns run(n) -> seconds."""
    cfg = benchlib.config(config, overrides)
    model = build_model(cfg)
    variables = benchlib.random_variables(model)
    rng = np.random.default_rng(0)
    params, stats = split_collections({g: variables[g] for g in BACKBONE_GROUPS})
    tx = backbone_optimizer(cfg, steps_per_epoch)
    state = train_state(tx, params, stats, ema=cfg.ema_decay > 0)
    # The step at image_size, unless the variant names lowres_size: then the step at that
    # size (the config's default progressive resizing alone does not change what is timed).
    step = make_backbone_step(model, cfg, tx, int(overrides.get("lowres_size", 0)),
                              total_steps=cfg.epochs * steps_per_epoch)
    images = rng.integers(0, 256, (cfg.batch_size, cfg.image_size, cfg.image_size, 3), np.uint8)
    labels = rng.integers(0, cfg.num_classes, cfg.batch_size).astype(np.int32)
    holder = {"state": state, "i": 0}

    def run(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            holder["state"], m = step(holder["state"], images, labels,
                                      jax.random.PRNGKey(holder["i"]))
            holder["i"] += 1
        jax.block_until_ready(m["loss"])
        return time.perf_counter() - t

    return cfg, run


def main(argv: list[str] | None = None) -> None:
    p = benchlib.parser(__doc__)
    p.add_argument("variants", nargs="*", default=["base"],
                   help="name or name:key=value,... (default: the config alone)")
    benchlib.config_flags(p)
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    runners = []
    for text in args.variants:
        name, overrides = parse_variant(text)
        overrides = {**benchlib.overrides(args.set), **overrides}
        cfg, run = make_runner(args.config, overrides, steps_per_epoch=170)
        t = time.perf_counter()
        run(1)  # compile
        print(f"{name}: compiled in {time.perf_counter() - t:.1f} s "
              f"(batch {cfg.batch_size}, overrides {overrides or 'none'})", flush=True)
        runners.append((name, cfg.batch_size, run))
    rates = np.zeros((args.rounds, len(runners)))
    for r in range(args.rounds):
        for j, (_, batch, run) in enumerate(runners):
            rates[r, j] = args.steps * batch / run(args.steps)
        print(f"round {r + 1}: " + ", ".join(f"{n} {rates[r, j]:.1f}"
                                              for j, (n, _, _) in enumerate(runners)), flush=True)
    print(f"\n{jax.devices()[0].platform}, {args.rounds} rounds x {args.steps} steps")
    print("| variant | images/s (median) | min-max | ratio to first (median, min-max) |")
    print("|---|---:|---:|---:|")
    for j, (name, _, _) in enumerate(runners):
        ratio = rates[:, j] / rates[:, 0]
        print(f"| {name} | {np.median(rates[:, j]):.1f} | {rates[:, j].min():.1f}-"
              f"{rates[:, j].max():.1f} | {np.median(ratio):.3f} ({ratio.min():.3f}-"
              f"{ratio.max():.3f}) |")


if __name__ == "__main__":
    main()
