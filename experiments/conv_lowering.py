"""Every convolution of a config's forward, timed in each lowering we can reach, per shape.

    python experiments/conv_lowering.py --config full --batch 8
    python experiments/conv_lowering.py --config full --batch 8 --dtype bfloat16 --tf

Collects the convolutions (and the 1x1 convolutions run as dots) of the eval-mode forward
`stem -> end` + O2 from its jaxpr, groups equal shapes, and times each shape alone:
- `xla`: `lax.conv_general_dilated` in NHWC/HWIO, as `segments.Conv` runs kxk convs;
- `dot`: a 1x1 conv (stride 1) as one matmul, as `segments.Conv` runs them;
- `nchw`: the same conv in NCHW/OIHW (XLA picks its own layout inside; this shows whether
  the logical layout changes the kernel);
- `tf` (with --tf): `tf.nn.conv2d` in a `tf.function`, which Keras runs on a CPU (oneDNN).
Prints per shape the median ms and GFLOP/s of each, then the forward's total conv time per
lowering (each shape's time times its count): where the forward's time goes, and how much a
faster kernel could save.

With --pools it times instead every pooling of the forward, forward and gradient, as
`lax.reduce_window` (Flax's pools), as strided slices (`cnneb_jax.pooling`) and, where built, as
oneDNN's pooling kernels (forward_training with a workspace for max pooling, and backward).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cnneb_jax.configs import CONFIGS, get_config  # noqa: E402
from cnneb_jax.model import abstract_variables, branch_fn, build_model  # noqa: E402
from cnneb_jax.timing import median_seconds  # noqa: E402


def conv_shapes(config: str, batch: int) -> collections.Counter:
    """(x shape, w shape, strides, padding) of each conv in the O2-only forward, counted."""
    cfg = get_config(config)
    cfg = cfg.replace(num_classes=cfg.num_classes or 10)
    model = build_model(cfg)
    v = abstract_variables(model)
    m = model.num_exits
    fns = [branch_fn(model, i, "seg") for i in range(m - 1)] + [branch_fn(model, m - 1, "plain")]

    def fwd(v, x):
        for f in fns:
            x = f(v, x)
        return x
    x = jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(fwd)(v, x)
    found: collections.Counter = collections.Counter()

    def walk(jp):
        for eqn in jp.eqns:
            for sub in eqn.params.values():  # pjit / custom_vjp bodies
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    walk(sub)
            if eqn.primitive.name == "conv_general_dilated":
                xs, ws = (tuple(a.aval.shape) for a in eqn.invars)
                pad = tuple(tuple(p) for p in eqn.params["padding"])
                found[(xs, ws, tuple(eqn.params["window_strides"]), pad)] += 1
            elif eqn.primitive.name == "dot_general":
                xs, ws = (tuple(a.aval.shape) for a in eqn.invars)
                if len(xs) == 4 and len(ws) == 2:
                    found[(xs, (1, 1) + ws, (1, 1), ((0, 0), (0, 0)))] += 1
    walk(jaxpr.jaxpr)
    return found


def pool_calls(config: str, batch: int) -> collections.Counter:
    """(kind, x shape, k, s, padding, count_include_pad) of each pool in the forward."""
    from cnneb_jax import heads, segments
    found: collections.Counter = collections.Counter()
    saved = (segments.max_pool, segments.avg_pool, heads.avg_pool)

    def spy(kind, fn):
        def call(x, k, s, padding, *args, **kw):
            include = (kw.get("count_include_pad", True),) if kind == "avg" else ()
            found[(kind, tuple(x.shape), k, s, padding, *include)] += 1
            return fn(x, k, s, padding, *args, **kw)
        return call
    segments.max_pool = spy("max", saved[0])
    segments.avg_pool = heads.avg_pool = spy("avg", saved[1])
    try:
        conv_shapes(config, batch)
    finally:
        segments.max_pool, segments.avg_pool, heads.avg_pool = saved
    return found


def time_pools(args) -> None:
    import flax.linen as nn
    from cnneb_jax import onednn
    from cnneb_jax.pooling import avg_pool, max_pool
    rng = np.random.default_rng(0)
    totals: dict[str, float] = collections.defaultdict(float)
    ways = ["rw", "slices"] + (["onednn"] if onednn.available() else [])
    print("| pool | x | n | " + " | ".join(f"{w} ms" for w in ways) + " | "
          + " | ".join(f"{w} grad ms" for w in ways) + " |")
    print("|---|---|---:|" + "---:|" * (2 * len(ways)))
    for (kind, xs, k, s, pad, *rest), n in pool_calls(args.config, args.batch).items():
        if xs[0] != args.batch:  # traced while the variables' shapes were worked out
            continue
        x = jnp.asarray(rng.standard_normal(xs), args.dtype)
        if kind == "max":
            fns = {"rw": lambda x: nn.max_pool(x, (k, k), (s, s), pad),
                   "slices": lambda x: max_pool(x, k, s, pad, "off"),
                   "onednn": lambda x: max_pool(x, k, s, pad, "on")}
        else:
            include = rest[0] if rest else True
            fns = {"rw": lambda x: nn.avg_pool(x, (k, k), (s, s), pad,
                                               count_include_pad=include),
                   "slices": lambda x: avg_pool(x, k, s, pad, include, "off"),
                   "onednn": lambda x: avg_pool(x, k, s, pad, include, "on")}
        t = {}
        for name in ways:
            f = fns[name]
            fwd = jax.jit(f)
            grad = jax.jit(jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32) ** 2)))
            t[name] = median_ms(lambda: fwd(x).block_until_ready(), args.reps)
            t[name + " grad"] = median_ms(lambda: grad(x).block_until_ready(), args.reps)
        for key_, v in t.items():
            totals[key_] += n * v
        print(f"| {kind} {k}x{k}/{s} {pad} | {xs} | {n} | "
              + " | ".join(f"{t[w]:.2f}" for w in ways) + " | "
              + " | ".join(f"{t[w + ' grad']:.2f}" for w in ways) + " |", flush=True)
    print("\nTotal pool time of the forward, ms (each shape's time x its count; grad: forward "
          "and gradient):")
    for key_, v in totals.items():
        print(f"  {key_}: {v:.1f}")


def median_ms(call, reps: int) -> float:
    """Median ms of `reps` calls after two warm-up calls (the first compiles)."""
    call()
    call()
    return 1e3 * median_seconds(call, reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="full", choices=sorted(CONFIGS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--tf", action="store_true", help="also time tf.nn.conv2d (oneDNN)")
    p.add_argument("--pools", action="store_true", help="time the pools instead of the convs")
    args = p.parse_args()
    if args.pools:
        time_pools(args)
        return
    dt = jnp.dtype(args.dtype)
    shapes = conv_shapes(args.config, args.batch)
    rng = np.random.default_rng(0)
    if args.tf:
        import tensorflow as tf
    totals: dict[str, float] = collections.defaultdict(float)
    print(f"{args.config}, batch {args.batch}, {args.dtype}, {jax.__version__}; "
          f"{sum(shapes.values())} convs in {len(shapes)} shapes")
    print("| x | kernel | stride | n | GFLOP | xla ms | dot ms | nchw ms | tf ms | best |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for (xs, ws, st, pad), n in sorted(shapes.items(), key=lambda kv: -np.prod(kv[0][1])):
        x = jnp.asarray(rng.standard_normal(xs), dt)
        w = jnp.asarray(rng.standard_normal(ws) * 0.1, dt)
        out_hw = [(xs[1 + i] + sum(pad[i]) - ws[i]) // st[i] + 1 for i in range(2)]
        gflop = 2 * xs[0] * out_hw[0] * out_hw[1] * np.prod(ws) / 1e9
        f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
            x, w, st, pad, dimension_numbers=("NHWC", "HWIO", "NHWC")))
        t = {"xla": median_ms(lambda: f(x, w).block_until_ready(), args.reps)}
        if ws[:2] == (1, 1) and st == (1, 1):
            g = jax.jit(lambda x, w: jnp.dot(x, w.reshape(ws[2], ws[3])))
            t["dot"] = median_ms(lambda: g(x, w).block_until_ready(), args.reps)
        xn, wn = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1))
        h = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
            x, w, st, pad, dimension_numbers=("NCHW", "OIHW", "NCHW")))
        t["nchw"] = median_ms(lambda: h(xn, wn).block_until_ready(), args.reps)
        if args.tf:
            tdt = tf.bfloat16 if args.dtype == "bfloat16" else tf.float32
            xt = tf.constant(np.asarray(x, np.float32), tdt)
            wt = tf.constant(np.asarray(w, np.float32), tdt)
            tpad = [(0, 0), *pad, (0, 0)]
            c = tf.function(lambda a, b: tf.nn.conv2d(a, b, (1, *st, 1), tpad))
            # CPU tf.functions return once the op has run; .numpy() would add a copy.
            t["tf"] = median_ms(lambda: c(xt, wt), args.reps)
        for k, v in t.items():
            totals[k] += n * v
        # A lowering missing for a shape counts at XLA's time in the totals' "best".
        best = min(t, key=t.get)
        totals["best of ours"] += n * min(v for k, v in t.items() if k != "tf")
        cells = [f"{t[k]:.2f}" if k in t else "-" for k in ("xla", "dot", "nchw", "tf")]
        print(f"| {xs} | {ws[0]}x{ws[1]} {ws[2]}->{ws[3]} | {st[0]} | {n} | {gflop:.3f} | "
              + " | ".join(cells) + f" | {best} |", flush=True)
    print("\nTotal conv time of the forward, ms (each shape's time x its count):")
    for k, v in totals.items():
        print(f"  {k}: {v:.0f}")


if __name__ == "__main__":
    main()
