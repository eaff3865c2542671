"""Every oneDNN primitive a train step (or forward) runs, ours against Keras's, with its time.

    python experiments/onednn_calls.py --task train --batch 8 --steps 3

Keras on TensorFlow's CPU build runs its convolutions, BatchNorm, ReLU and pooling through
oneDNN (Keras turns XLA off on CPU-only machines), and our kernels go through oneDNN too
(cnneb_jax/onednn.py). oneDNN's verbose mode (`ONEDNN_VERBOSE=1`) prints each primitive it
executes with its time, so the two steps can be compared primitive by primitive: which
kind (convolution forward, backward data, backward weights, batch normalization, ...)
costs what on each side, and how much of each step's wall time runs outside oneDNN (XLA's
own ops for us, TensorFlow's for Keras). Each side runs in its own process, after two
warm-up steps; the tables are per step (median over `--steps`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_BENCH = Path(__file__).resolve().parents[1] / "bench"
_MARK = "ONEDNN_CALLS_STEP"


def worker(side: str, task: str, batch: int, steps: int) -> None:
    """Runs `steps` timed calls, printing a marker line with the wall time after each."""
    sys.path.insert(0, str(_BENCH))
    from peer import jax_call, keras_call
    call, _ = (keras_call(task, "float32", batch) if side == "keras"
               else jax_call(task, "float32", batch, "full"))
    call()
    call()
    print(f"{_MARK} start", flush=True)
    for _ in range(steps):
        t = time.perf_counter()
        call()
        print(f"{_MARK} {(time.perf_counter() - t) * 1e3:.3f}", flush=True)


def parse(lines: list[str]) -> list[dict]:
    """Per step: {"wall": ms, "calls": [(kind, prop, shape, ms), ...]} from verbose output
    (oneDNN 3.2's `onednn_verbose,exec,cpu,...` and 3.7's `onednn_verbose,v1,primitive,exec,
    cpu,...`; the last field is the time in ms)."""
    steps, calls, started = [], [], False
    for line in lines:
        if line.startswith(_MARK):
            word = line.split()[1]
            if started and word != "start":
                steps.append({"wall": float(word), "calls": calls})
            started, calls = True, []
            continue
        if not (started and line.startswith("onednn_verbose")):
            continue
        f = line.strip().split(",")
        if "exec" not in f:
            continue
        i = f.index("exec")
        if i + 4 >= len(f) or f[i + 1] != "cpu":
            continue
        try:
            ms = float(f[-1])
        except ValueError:
            continue
        calls.append((f[i + 2], f[i + 4], f[-2], ms))
    return steps


_CONV = re.compile(r"mb(\d+)_ic(\d+)oc(\d+)_ih\d+oh(\d+)kh(\d+)\S*_iw\d+ow(\d+)kw(\d+)")


def conv_flops(shape: str) -> float:
    """Multiply-adds x 2 of one convolution call from oneDNN's shape string (0 if none)."""
    m = _CONV.match(shape)
    if not m:
        return 0.0
    mb, ic, oc, oh, kh, ow, kw = map(int, m.groups())
    return 2.0 * mb * ic * oc * oh * ow * kh * kw


def by_shape(steps: list[dict], top: int) -> list[tuple]:
    """The `top` (kind, prop, shape) of the last step by time: (key, ms, calls, GFLOP/s)."""
    agg: dict[tuple, list] = collections.defaultdict(lambda: [0.0, 0])
    for kind, prop, shape, ms in steps[-1]["calls"]:
        agg[(kind, prop, shape)][0] += ms
        agg[(kind, prop, shape)][1] += 1
    rows = sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]
    return [(k, ms, n, conv_flops(k[2]) * n / ms / 1e6 if ms else 0.0) for k, (ms, n) in rows]


def summarise(steps: list[dict], top: int = 0) -> dict:
    by_kind: dict[str, list[float]] = collections.defaultdict(list)
    counts: dict[str, int] = collections.Counter()
    for s in steps:
        per: dict[str, float] = collections.defaultdict(float)
        for kind, prop, _, ms in s["calls"]:
            per[f"{kind} {prop}"] += ms
        for k, v in per.items():
            by_kind[k].append(v)
    for kind, prop, _, _ in steps[-1]["calls"] if steps else []:
        counts[f"{kind} {prop}"] += 1
    wall = float(np.median([s["wall"] for s in steps]))
    inside = float(np.median([sum(c[3] for c in s["calls"]) for s in steps]))
    return {"wall": wall, "inside": inside,
            "kinds": {k: (float(np.median(v)), counts[k]) for k, v in by_kind.items()},
            "shapes": by_shape(steps, top) if steps else []}


def run_side(side: str, args) -> dict:
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"}
    cmd = [sys.executable, __file__, "--worker", side, "--task", args.task,
           "--batch", str(args.batch), "--steps", str(args.steps)]
    got = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if got.returncode != 0:
        raise SystemExit(f"{side} failed:\n{got.stderr[-3000:]}")
    return summarise(parse(got.stdout.splitlines()), args.top)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="train", choices=("train", "forward"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=30, help="primitives by shape to list per side")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.task, args.batch, args.steps)
        return
    sides = {s: run_side(s, args) for s in ("ours", "keras")}
    print(f"# {args.task}, full config / Keras InceptionV3, float32, batch {args.batch}, "
          f"median of {args.steps} steps, ONEDNN_VERBOSE=1 (which slows each call a little)")
    print("| | ours | Keras |\n|---|---:|---:|")
    print("| wall time of a step, ms | " + " | ".join(f"{sides[s]['wall']:.1f}" for s in sides) + " |")
    print("| inside oneDNN, ms | " + " | ".join(f"{sides[s]['inside']:.1f}" for s in sides) + " |")
    print("| outside oneDNN, ms | " + " | ".join(
        f"{sides[s]['wall'] - sides[s]['inside']:.1f}" for s in sides) + " |")
    kinds = sorted(set(sides["ours"]["kinds"]) | set(sides["keras"]["kinds"]),
                   key=lambda k: -max(sides[s]["kinds"].get(k, (0, 0))[0] for s in sides))
    print("\n| oneDNN primitive | ours, ms (calls) | Keras, ms (calls) |\n|---|---:|---:|")
    for k in kinds:
        cells = [f"{sides[s]['kinds'][k][0]:.1f} ({sides[s]['kinds'][k][1]})"
                 if k in sides[s]["kinds"] else "-" for s in sides]
        print(f"| {k.replace('_', ' ')} | " + " | ".join(cells) + " |")
    for side in sides:
        print(f"\n{side}: the {args.top} costliest primitives by shape, last step (GFLOP/s for "
              "convolutions)\n| primitive | shape | ms | calls | GFLOP/s |\n|---|---|---:|---:|---:|")
        for (kind, prop, shape), ms, n, gf in sides[side]["shapes"]:
            # underscores as spaces, so a results page can name a line by its words
            print(f"| {kind} {prop} | {shape} | {ms:.1f} | {n} | {gf:.0f} |".replace("_", " "))
    print("\nRESULT " + json.dumps(sides))


if __name__ == "__main__":
    main()
