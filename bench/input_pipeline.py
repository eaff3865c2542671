"""The streaming input path against the in-memory one, and its peak memory.

    # training images/s, same config, in-memory vs streamed, side by side (ABAB rounds)
    python bench/input_pipeline.py throughput --data-dir ../shared/datasets/cifar10-jpeg
    # peak resident memory and images/s of a few training steps, for two folder sizes
    python bench/input_pipeline.py memory --data-dir ../shared/datasets/imagenette-224 \
        --config full --set num_classes=0 --set resize=resize_crop --set batch_size=8 \
        --per-class 30 300 --steps 5

`throughput` runs the config's real train step (augmentation, forward, backward, optimizer,
EMA) on real batches: from the decoded array (`pipeline=memory`) or decoded from the files
by tf.data (`pipeline=stream`), one round of `--steps` steps of each in turn. Each round
starts a new epoch's iterator, as training does. Prints the median images/s of each, the
spread over rounds and the per-round ratio stream/memory.

`memory` builds image folders of `--per-class` training images per class (symlinks to the
first files of `--data-dir`), then trains `--steps` steps in a fresh process for each size
and input path and prints the process's peak resident memory (ru_maxrss, which includes
XLA compiling the step), its resident memory after the steps, and images/s.
The decoded-array path holds every image; the streamed one holds a few batches.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import benchlib
from cnneb_jax import data as data_lib
from cnneb_jax import pipeline, splits
from cnneb_jax.backbone_stage import make_backbone_step
from cnneb_jax.cache import cache_root
from cnneb_jax.configs import get_config
from cnneb_jax.model import BACKBONE_GROUPS, build_model, init_variables, split_collections
from cnneb_jax.optim import backbone_optimizer, train_state
from cnneb_jax.pipeline import epoch_batches


def make_trainer(cfg, steps_per_epoch: int):
    """The config's compiled train step and state; returns run(images, labels, rows, epoch)
    -> seconds for the rows' steps, data reading included."""
    model = build_model(cfg)
    variables = init_variables(model, jax.random.PRNGKey(0))
    params, stats = split_collections({g: variables[g] for g in BACKBONE_GROUPS})
    tx = backbone_optimizer(cfg, steps_per_epoch)
    state = train_state(tx, params, stats, ema=cfg.ema_decay > 0)
    step = make_backbone_step(model, cfg, tx)
    holder = {"state": state, "i": 0}

    def run(images, labels, rows, epoch: int) -> float:
        t = time.perf_counter()
        m = None
        for x, y in pipeline.batches(images, labels, rows, train=True, seed=cfg.seed,
                                     epoch=epoch):
            holder["state"], m = step(holder["state"], x, y, jax.random.PRNGKey(holder["i"]))
            holder["i"] += 1
        jax.block_until_ready(m["loss"])
        return time.perf_counter() - t

    return run


def throughput(args) -> None:
    cfg = get_config(args.config, benchlib.overrides(args.set))
    mem = data_lib.load_dataset(cfg.replace(pipeline="memory"), args.data_dir)
    st = data_lib.load_dataset(cfg.replace(pipeline="stream"), args.data_dir)
    cfg = splits.with_classes(cfg, mem["class_names"])
    n = len(mem["train_labels"])
    run = make_trainer(cfg, n // cfg.batch_size)
    sources = {"memory": mem["train_images"], "stream": st["train_images"]}
    rows = lambda r: epoch_batches(np.random.default_rng([cfg.seed, r]), n,
                                   cfg.batch_size)[:args.steps]
    run(mem["train_images"], mem["train_labels"], rows(0)[:2], 0)  # compile
    rates: dict[str, list[float]] = {k: [] for k in sources}
    for r in range(args.rounds):
        for name, images in sources.items():
            sec = run(images, mem["train_labels"], rows(r + 1), r + 1)
            rates[name].append(args.steps * cfg.batch_size / sec)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rates.items()),
              flush=True)
    ratio = np.array(rates["stream"]) / np.array(rates["memory"])
    print(f"\nconfig {cfg.name}, batch {cfg.batch_size}, {args.steps} steps x {args.rounds} rounds")
    for k, v in rates.items():
        print(f"{k:>7}: {benchlib.spread(v)} img/s, median (min-max)")
    print(f"stream / memory: {benchlib.spread(ratio, '{:.3f}')}")


def _link_folder(src: Path, dst: Path, per_class: int) -> Path:
    """dst/{train,test}/<class>/ with symlinks to the first `per_class` training files of
    each class (and all test files)."""
    for split in ("train", "test"):
        for cdir in sorted((src / split).iterdir()):
            out = dst / split / cdir.name
            out.mkdir(parents=True, exist_ok=True)
            files = sorted(cdir.iterdir())
            for f in files[:per_class] if split == "train" else files:
                os.symlink(f.resolve(), out / f.name)
    return dst


def peak_run(args) -> None:
    """One size, one path, in this (fresh) process: prints a JSON line."""
    cfg = get_config(args.config, benchlib.overrides(args.set))
    cfg = cfg.replace(pipeline=args.pipeline, val_size=0, calib_size=0)
    t0 = time.perf_counter()
    d = data_lib.load_dataset(cfg, args.data_dir, Path(args.cache_dir))
    load_s = time.perf_counter() - t0
    cfg = splits.with_classes(cfg, d["class_names"])
    n = len(d["train_labels"])
    run = make_trainer(cfg, max(1, n // cfg.batch_size))
    rows = epoch_batches(np.random.default_rng(0), n, cfg.batch_size)
    run(d["train_images"], d["train_labels"], rows[:1], 0)  # compile
    steps = min(args.steps, len(rows) - 1)
    sec = run(d["train_images"], d["train_labels"], rows[1:1 + steps], 0)
    print(json.dumps({"pipeline": args.pipeline, "train_images": n, "load_s": load_s,
                      "steps": steps, "img_per_s": steps * cfg.batch_size / sec,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "rss_after_mib": _rss_mib()}))


def _rss_mib() -> float:
    """Resident memory now (the peak above includes XLA's compilation of the step)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory(args) -> None:
    src = Path(args.data_dir)
    with tempfile.TemporaryDirectory(prefix="cnneb-folders-") as tmp:
        results = []
        for per_class in args.per_class:
            folder = Path(tmp) / f"{src.name}-{per_class}"
            if not folder.exists():  # a size listed twice is measured twice, on one folder
                _link_folder(src, folder, per_class)
            for path in args.pipelines:
                cmd = [sys.executable, __file__, "_peak", "--data-dir", str(folder),
                       "--config", args.config, "--pipeline", path, "--steps", str(args.steps),
                       "--cache-dir", str(Path(tmp) / "cache")]
                for kv in args.set:
                    cmd += ["--set", kv]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(rec)
                print(f"{rec['train_images']:>6} training images, {path:>6}: peak RSS "
                      f"{rec['peak_rss_mib']:.0f} MiB, RSS after the steps "
                      f"{rec['rss_after_mib']:.0f} MiB, {rec['img_per_s']:.2f} img/s over "
                      f"{rec['steps']} steps (data ready in {rec['load_s']:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = benchlib.parser(__doc__)
    p.add_argument("mode", choices=["throughput", "memory", "_peak"])
    p.add_argument("--data-dir", required=True, help="an image folder (train/, test/)")
    benchlib.config_flags(p)
    p.add_argument("--steps", type=int, default=20, help="train steps per round / run")
    p.add_argument("--rounds", type=int, default=5, help="throughput: ABAB rounds")
    p.add_argument("--per-class", type=int, nargs="+", default=[30, 300],
                   help="memory: training images per class of each folder size")
    p.add_argument("--pipelines", nargs="+", default=["stream", "memory"],
                   help="memory: the input paths to measure")
    p.add_argument("--pipeline", default="stream", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=str(cache_root()), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    {"throughput": throughput, "memory": memory, "_peak": peak_run}[args.mode](args)


if __name__ == "__main__":
    main()
