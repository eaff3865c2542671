"""Our Inception v3 against Keras's on the same machine: forward and train step, float32 and
bfloat16, each measurement in its own process, in interleaved rounds.

    python bench/peer.py                          # everything, 3 rounds (about 30 min on 2 cores)
    python bench/peer.py --only forward --batches 8 --rounds 2
    python bench/peer.py --baseline-python /tmp/venv311/bin/python   # adds "ours (base)"
    git worktree add /tmp/base HEAD~1 && python bench/peer.py --baseline-tree /tmp/base

Ours: the `full` config (299x299, standard widths, 1,000 classes) as the cascade runs it
when every image goes deep: the program `stem -> Mixed_5b`, then `Mixed_5b -> end` and O2
(`model.branch_fn`), random weights with identity BatchNorm statistics. Peer:
`keras.applications.InceptionV3(weights=None, classifier_activation=None)` called through
a `tf.function`, as a Keras user runs it (on a CPU Keras leaves XLA off by default).
Precisions: float32, and bfloat16 (ours: `compute_dtype=bfloat16`, float32 master weights
and BatchNorm statistics; Keras: the `mixed_bfloat16` policy); ours also, forward only,
`bfloat16_deep` (segment 0 in float32, the rest in bfloat16) and `bfloat16_checked`
(bfloat16, the close calls rerun in float32 at the shipped model's share: checked_forward),
the precisions that keep the shipped model's labels (bench/precision_agreement.py). "best
valid" compares the fastest of those and float32 with Keras's bfloat16. Train step: SGD with momentum
0.9 on the cross-entropy of O2, BatchNorm in training mode, weights updated in place.

Each measurement starts a fresh process (`--worker`), builds and compiles, runs two warm-up
calls, then times calls for about `--seconds` (at least 5) and reports their median. Rounds
run every measurement once, in reverse order every other round, so a drifting machine
touches all alike. The table gives each measurement's median over rounds with min-max, and
the speed ratios Keras time / our time per round (above 1: ours is faster), median and
min-max. Our workers share one JAX compilation cache in a temporary folder, so only the
first round compiles. The `cifar` rows are our own figures (no peer): the backbone's real
train step (augmentation, both exits, EMA) at 32x32 and at the progressive-resizing 24x24,
and the O2-only forward, at the config's batch of 128.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Our workers run as our entry points do: freed host memory kept for reuse (set before
# NumPy starts threads; cnneb_jax/host_memory.py). Keras's run as a Keras user's do, with
# glibc as it is.
from cnneb_jax.host_memory import keep_freed_memory  # noqa: E402

if __name__ == "__main__" and "--worker" in sys.argv:
    if json.loads(sys.argv[sys.argv.index("--worker") + 1]).get("side") != "keras":
        keep_freed_memory()

import numpy as np  # noqa: E402

import benchlib  # noqa: E402

ROOT = benchlib.ROOT
PRECISIONS = ("float32", "bfloat16", "bfloat16_deep", "bfloat16_checked")
# Our inference precisions that give float32's labels on at least 99.8% of the shipped
# model's test images with O1 and O2 within 0.2 points (issue 31's bar; bfloat16 everywhere
# does not): docs/results/2026-12-07-precision-agreement-s33.txt, bench/precision_agreement.py.
VALID_INFERENCE = ("float32", "bfloat16_deep", "bfloat16_checked")
# bfloat16_checked reruns the shipped model's share of close calls (checked_forward).
CHECKED_SHARE_FILE = ROOT / "pretrained" / "cifar" / "precision_check.json"
CHECKED_POOL = 256


# ----------------------------------------------------------------------------- workers

def _timed(call, seconds: float, min_reps: int = 5, max_reps: int = 200) -> list[float]:
    """Milliseconds of each call after two warm-up calls (the first compiles)."""
    call()
    call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < seconds
                                    and len(times) < max_reps):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def jax_call(task: str, precision: str, batch: int, config: str):
    """(call, images per call): one compiled forward or train step of ours, ready to run."""
    import jax
    import jax.numpy as jnp
    import optax
    from cnneb_jax.configs import get_config
    from cnneb_jax.model import build_model, to_compute_dtype

    if task in ("cifar_train32", "cifar_train24"):
        from train_throughput import make_runner
        size = {"cifar_train32": "0", "cifar_train24": "24"}[task]
        overrides = {"compute_dtype": precision, "lowres_size": size}
        cfg, run = make_runner(config, overrides, steps_per_epoch=170)
        return (lambda: run(1)), cfg.batch_size
    if task == "forward" and precision == "bfloat16_checked":
        return checked_forward(config, batch)
    rng = np.random.default_rng(1)
    if task == "forward":
        cfg, forward = forward_fn(config, precision)
        x = rng.uniform(0, 255, (batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
        xd = jax.device_put(x)
        return (lambda: jax.block_until_ready(forward(xd))), batch
    cfg = get_config(config, {"compute_dtype": precision})
    cfg = cfg.replace(num_classes=cfg.num_classes or 10)
    model = build_model(cfg)
    variables = benchlib.random_variables(model)
    m = model.num_exits
    x = rng.uniform(0, 255, (batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    # The train step: segments and O2 only (no O1), SGD with momentum, BatchNorm in
    # training mode; mixed precision as the backbone stage runs it (model.to_compute_dtype).
    from cnneb_jax.augment import normalize
    segs = list(model.segments.values())
    seg_names = list(model.segments)
    head = model.heads[f"O{m}"]
    params = {"segments": {n: variables["segments"][n]["params"] for n in seg_names},
              "head": variables["heads"][f"O{m}"]["params"]}
    stats = {n: variables["segments"][n]["batch_stats"] for n in seg_names}
    tx = optax.sgd(0.01, momentum=0.9)

    def loss_fn(p, s, images, labels):
        h = normalize(images)
        new = {}
        pc, h = to_compute_dtype(cfg, (p, h))
        for n, seg in zip(seg_names, segs):
            h, upd = seg.apply({"params": pc["segments"][n], "batch_stats": s[n]}, h,
                               train=True, mutable=["batch_stats"])
            new[n] = upd["batch_stats"]
        logits = head.apply({"params": pc["head"]}, h, train=True).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new

    @jax.jit
    def step(state, images, labels):
        p, s, opt = state
        (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, images, labels)
        updates, opt = tx.update(g, opt, p)
        return (optax.apply_updates(p, updates), new, opt), loss

    y = jax.device_put(rng.integers(0, cfg.num_classes, batch).astype(np.int32))
    xd = jax.device_put(x)
    holder = {"state": jax.device_put((params, stats, tx.init(params)))}

    def call():
        holder["state"], loss = step(holder["state"], xd, y)
        jax.block_until_ready(loss)
    return call, batch


def forward_fn(config: str, precision: str):
    """(cfg, forward): forward(x) runs our O2 path on a batch of pixels as the cascade runs
    it when every image goes deep, and returns O2's logits (on the device)."""
    import jax
    from cnneb_jax.configs import get_config
    from cnneb_jax.model import build_model, branch_fn, inference_variables
    cfg = get_config(config, {"compute_dtype": precision})
    cfg = cfg.replace(num_classes=cfg.num_classes or 10)
    model = build_model(cfg)
    variables = benchlib.random_variables(model)
    m = model.num_exits
    # as a loaded cascade holds them (programs.make_cascade)
    v = jax.device_put(inference_variables(cfg, {g: variables[g] for g in ("segments", "heads")}))
    first = jax.jit(branch_fn(model, 0, "seg"))
    rest = [jax.jit(branch_fn(model, i, "seg")) for i in range(1, m - 1)]
    last = jax.jit(branch_fn(model, m - 1, "plain"))

    def forward(x):
        h = first(v, x)
        for f in rest:
            h = f(v, h)
        return last(v, h)
    return cfg, forward


def checked_forward(config: str, batch: int):
    """(call, images per batch, batches per call) of bfloat16_checked (cnneb_jax/recheck.py)
    as the cascade runs it when every image goes deep: the bfloat16 program on a batch, O2's
    logits read on the host, the rows whose top-2 margin falls below a threshold rerun in
    float32 (padded to a bucket; the same random weights). Random weights and images have no
    real close calls, so the threshold is set on a pool of CHECKED_POOL random images to
    rerun the shipped model's share (CHECKED_SHARE_FILE: its held-out share at O2, rounded
    up to whole images of the pool). A call runs the whole pool, so that every call reruns
    that share; the bench divides its time by the batches in it."""
    import jax
    from cnneb_jax.programs import bucket_sizes
    from cnneb_jax.recheck import top2_margin
    from cnneb_jax.routing import bucket_for, pad_rows
    share = json.loads(CHECKED_SHARE_FILE.read_text())["heldout_rerun"][-1]
    cfg, low = forward_fn(config, "bfloat16")
    _, high = forward_fn(config, "float32")
    n = max(batch, CHECKED_POOL // batch * batch)
    size = cfg.image_size
    pool = np.random.default_rng(1).uniform(0, 255, (n, size, size, 3)).astype(np.float32)
    on_device = [jax.device_put(pool[s:s + batch]) for s in range(0, n, batch)]
    margins = np.concatenate([top2_margin(np.asarray(low(x))) for x in on_device])
    threshold = np.sort(margins)[min(math.ceil(share * n), n - 1)]
    buckets = bucket_sizes(batch)

    def call():
        for j, x in enumerate(on_device):
            rows = np.nonzero(top2_margin(np.asarray(low(x))) < threshold)[0]
            if len(rows):
                again = pad_rows(pool[j * batch + rows], bucket_for(buckets, len(rows)))
                jax.block_until_ready(high(again))
    return call, batch, len(on_device)


def keras_call(task: str, precision: str, batch: int):
    """(call, images per call): Keras's InceptionV3 forward or train step, ready to run."""
    # TensorFlow's defaults, oneDNN's kernels on: `tfenv.quiet()` turns them off (it serves
    # decoding, where they do not matter), and Keras without them ran 1.11x slower forward
    # and 1.30x slower in the train step (docs/results/2026-12-07-keras-onednn-ab.txt).
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf
    if precision == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = keras.applications.InceptionV3(weights=None, classifier_activation=None)
    rng = np.random.default_rng(1)
    # Keras's preprocess_input maps pixels to [-1, 1]; the cost does not depend on them.
    x = tf.constant(rng.uniform(-1, 1, (batch, 299, 299, 3)).astype(np.float32))
    if task == "forward":
        fwd = tf.function(lambda t: model(t, training=False))
        return (lambda: fwd(x).numpy()), batch
    y = tf.constant(rng.integers(0, 1000, batch).astype(np.int32))
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return (lambda: model.train_on_batch(x, y)), batch


def worker_main(spec: dict) -> None:
    per_call = []
    if spec["side"] == "keras":
        call, images = keras_call(spec["task"], spec["precision"], spec["batch"])
    else:
        call, images, *per_call = jax_call(spec["task"], spec["precision"], spec["batch"],
                                           spec["config"])
    # ms per batch: a call of bfloat16_checked runs several (checked_forward)
    batches = per_call[0] if per_call else 1
    out = {"ms": [t / batches for t in _timed(call, spec["seconds"])], "images": images}
    print("RESULT " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- driver

def our_sides(args) -> list[str]:
    """Ours, and the baseline's when one is given."""
    return ["ours"] + (["base"] if args.baseline_python or args.baseline_tree else [])


def measurements(args) -> list[dict]:
    sides = our_sides(args) + ([] if args.no_keras else ["keras"])
    out = []
    for task in args.only:
        batches = args.batches if task == "forward" else [8] if task == "train" else [128]
        for batch in batches:
            for precision in PRECISIONS:
                if task == "cifar" and precision not in args.cifar_precisions:
                    continue
                for side in sides:
                    if task == "cifar" and side == "keras":
                        continue
                    # per-part precision and reruns: ours, inference only
                    if precision in ("bfloat16_deep", "bfloat16_checked") and (
                            side == "keras" or task in ("train", "cifar")):
                        continue
                    subtasks = (["cifar_train32", "cifar_train24", "forward"]
                                if task == "cifar" else [task])
                    for sub in subtasks:
                        out.append({"side": side, "task": sub, "precision": precision,
                                    "batch": batch, "seconds": args.seconds,
                                    "config": "cifar" if task == "cifar" else args.config,
                                    "group": task})
    return out


def worker_command(side: str, args, cache: str) -> tuple[list[str], dict, Path]:
    """(command less its spec, environment, tree) of a worker of `side`. The tree's own code
    comes first on PYTHONPATH: the venv's editable install points at this checkout, and a
    worker that imported cnneb_jax before putting its tree on sys.path (peer.py did, from
    9940c33 until 2432147) timed this checkout's code as the baseline."""
    base = side == "base"
    python = (args.baseline_python or sys.executable) if base else sys.executable
    tree = Path(args.baseline_tree or ROOT).resolve() if base else ROOT
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache + ("-base" if base else ""),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    return [python, str(tree / "bench" / "peer.py")], env, tree


def check_code(args, cache: str) -> None:
    """Each side of ours imports cnneb_jax from its own tree, or the run stops here."""
    for side in our_sides(args):
        cmd, env, tree = worker_command(side, args, cache)
        got = subprocess.run([cmd[0], "-c", "import cnneb_jax; print(cnneb_jax.__file__)"],
                             capture_output=True, text=True, env=env, cwd=tree)
        where = Path(got.stdout.strip() or "?").resolve()
        if tree not in where.parents:
            raise SystemExit(f"peer: the {side} side imports cnneb_jax from {where}, not from "
                             f"{tree}{got.stderr[-500:]}")


def run_one(spec: dict, args, cache: str) -> float | None:
    cmd, env, tree = worker_command(spec["side"], args, cache)
    proc = subprocess.run(cmd + ["--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=tree)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            return float(np.median(res["ms"]))
    print(f"  failed: {label(spec)}\n{proc.stderr[-2000:]}", file=sys.stderr, flush=True)
    return None


def label(s: dict) -> str:
    who = {"ours": "ours", "base": "ours (base)", "keras": "Keras"}[s["side"]]
    what = s["task"] if s["group"] != "cifar" else f"cifar {s['task']}"
    return f"{who} {what} {s['precision']} b{s['batch']}"


def key(s: dict) -> tuple:
    return (s["side"], s["task"], s["precision"], s["batch"], s["config"])


def report(specs: list[dict], ms: dict[tuple, list[float]], rounds: int) -> None:
    spread = lambda a: benchlib.spread(a, "{:,.0f}")

    def ratio_text(num: tuple, den: tuple) -> str:
        if num not in ms or den not in ms:
            return "-"
        r = np.array([a / b if a and b else np.nan for a, b in zip(ms[num], ms[den])])
        r = r[np.isfinite(r)]
        if not len(r):
            return "-"
        return f"{np.median(r):.2f} ({r.min():.2f}-{r.max():.2f})"

    print(f"\n{rounds} rounds; ms per batch: median over rounds (min-max)\n")
    # Our side's config against Keras (full: 299x299, Keras' architecture).
    full = next((s["config"] for s in specs if s["group"] != "cifar"), "full")
    sides = sorted({s["side"] for s in specs}, key=["ours", "base", "keras"].index)
    names = {"ours": "ours", "base": "ours (base)", "keras": "Keras"}
    rows = sorted({(s["task"], s["batch"]) for s in specs if s["config"] == full},
                  key=lambda r: (r[0] != "forward", r[1]))
    if rows:
        print(f"| {full} | " + " | ".join(f"{names[s]} {p}" for s in sides
                                                 for p in PRECISIONS) + " |")
        print("|---|" + "---:|" * (len(sides) * len(PRECISIONS)))
        for task, b in rows:
            cells = [spread(ms[(s, task, p, b, full)]) if (s, task, p, b, full) in ms
                     else "-" for s in sides for p in PRECISIONS]
            print(f"| {task}, batch {b} | " + " | ".join(cells) + " |")
        print("\nSpeed ratios, Keras time / our time per round (above 1: ours faster), "
              "median (min-max):\n")
        print(f"| {full} | f32 vs Keras f32 | bf16 vs Keras bf16 | best valid vs Keras bf16"
              " | ours f32 vs base f32 |")
        print("|---|---:|---:|---:|---:|")
        median = lambda k: np.nanmedian(np.array([v or np.nan for v in ms[k]], float))
        for task, b in rows:
            o32, o16 = ("ours", task, "float32", b, full), ("ours", task, "bfloat16", b, full)
            k32, k16 = ("keras", task, "float32", b, full), ("keras", task, "bfloat16", b, full)
            valid = [("ours", task, p, b, full) for p in VALID_INFERENCE
                     if ("ours", task, p, b, full) in ms] if task == "forward" else [o32]
            best = min(valid, key=median) if valid else o32
            base = ("base", task, "float32", b, full)
            print(f"| {task}, batch {b} | {ratio_text(k32, o32)} | {ratio_text(k16, o16)} | "
                  f"{ratio_text(k16, best)} ({best[2]}) | {ratio_text(base, o32)} |")
    cifar = [s for s in specs if s["config"] == "cifar"]
    if cifar:
        print("\n| cifar, batch 128 | images/s, median (min-max) | speed vs base per round |")
        print("|---|---:|---:|")
        for s in cifar:
            a = np.array([v or np.nan for v in ms[key(s)]], float)
            ips = s["batch"] * 1e3 / a[np.isfinite(a)]
            text = (f"{np.median(ips):,.0f} ({ips.min():,.0f}-{ips.max():,.0f})"
                    if len(ips) else "failed")
            base = ("base",) + key(s)[1:]
            vs = ratio_text(base, key(s)) if s["side"] == "ours" else "-"
            print(f"| {names[s['side']]} {s['task']} {s['precision']} | {text} | {vs} |")


def main(argv: list[str] | None = None) -> None:
    p = benchlib.parser(__doc__)
    p.add_argument("--only", nargs="+", default=["forward", "train", "cifar"],
                   choices=["forward", "train", "cifar"], help="which groups to measure")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32],
                   help="forward batch sizes (default: 1 8 32)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=4.0,
                   help="timed seconds per measurement and process (at least 5 calls)")
    p.add_argument("--cifar-precisions", nargs="+", default=["float32"], choices=PRECISIONS)
    p.add_argument("--baseline-python", default="",
                   help="a second interpreter (another venv) whose JAX also runs our side: "
                        "before/after figures in one interleaved run")
    p.add_argument("--baseline-tree", default="",
                   help="another checkout (a git worktree) whose code runs the baseline side "
                        "(with --baseline-python's interpreter, or this one)")
    p.add_argument("--no-keras", action="store_true",
                   help="ours (and the baseline) only: an A/B of our own code")
    p.add_argument("--config", default="full",
                   help="our side's config (default full: Keras' architecture); a smaller "
                        "one (tiny) checks the script in seconds")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    specs = measurements(args)
    ms: dict[tuple, list[float | None]] = {key(s): [] for s in specs}
    print(f"{len(specs)} measurements x {args.rounds} rounds, each in its own process; "
          f"python {sys.version.split()[0]}"
          + ("" if args.no_keras else "; Keras with oneDNN's kernels (TF_ENABLE_ONEDNN_OPTS=1)"),
          flush=True)
    with tempfile.TemporaryDirectory(prefix="peer-xla-") as cache:
        check_code(args, cache)
        for r in range(args.rounds):
            order = specs if r % 2 == 0 else specs[::-1]
            t0 = time.perf_counter()
            for s in order:
                v = run_one(s, args, cache)
                ms[key(s)].append(v)
                print(f"  round {r + 1}: {label(s)}: "
                      f"{'failed' if v is None else f'{v:,.1f} ms'}", flush=True)
            print(f"round {r + 1} took {time.perf_counter() - t0:.0f} s", flush=True)
    report(specs, ms, args.rounds)


if __name__ == "__main__":
    main()
