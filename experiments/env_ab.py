"""bench/peer.py's workers under two environments, A and B, in interleaved rounds: does a
setting of the environment make our train step or forward faster?

The first question it answered: does the `full` train step get faster when no two oneDNN
primitives run at once?

XLA:CPU runs independent operations (the branches of an Inception block) on threads of its
own, and each oneDNN primitive spreads over every core with OpenMP, so two primitives at
once share the two cores with each other (experiments/conv_cold_cache.py found the
convolutions 1.4-2x slower inside the step than alone). `CNNEB_ONEDNN_SERIAL=1` makes the
FFI library run its primitives one at a time (XLA's own operations still run beside them).
Each worker runs in a fresh process, the order reversed every other round; the table gives
both medians and the ratio A/B per round (above 1: B is faster).

    python experiments/env_ab.py --b CNNEB_ONEDNN_SERIAL=1 --rounds 3 --tasks train:8
    python experiments/env_ab.py --b OMP_WAIT_POLICY=ACTIVE --rounds 3 --tasks train:8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", nargs="*", default=[], metavar="NAME=VALUE",
                   help="environment of side A (default: this process's)")
    p.add_argument("--b", nargs="+", required=True, metavar="NAME=VALUE",
                   help="environment of side B")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--tasks", nargs="+", default=["train:8", "forward:8"],
                   help="TASK:BATCH pairs, TASK train or forward (the full config) or "
                        "cifar_train32 (the cifar backbone's step; its batch is the config's); "
                        "keras:TASK:BATCH for Keras's InceptionV3")
    args = p.parse_args(argv)
    specs = []
    for t in args.tasks:
        side, t = ("keras", t[len("keras:"):]) if t.startswith("keras:") else ("ours", t)
        task, batch = t.split(":")
        specs.append({"side": side, "task": task, "precision": "float32", "batch": int(batch),
                      "seconds": args.seconds, "config": "cifar" if task.startswith("cifar")
                      else "full", "group": task})
    run_args = argparse.Namespace(baseline_python=None, baseline_tree=None)
    envs = {"A": dict(kv.split("=", 1) for kv in args.a),
            "B": dict(kv.split("=", 1) for kv in args.b)}
    base = dict(os.environ)
    ms = {(i, mode): [] for i in range(len(specs)) for mode in "AB"}
    with tempfile.TemporaryDirectory() as cache:
        for r in range(args.rounds):
            order = [(i, m) for i in range(len(specs)) for m in "AB"]
            for i, mode in (order if r % 2 == 0 else order[::-1]):
                os.environ.clear()
                os.environ.update(base | envs[mode])
                t = peer.run_one(specs[i], run_args, cache)
                ms[(i, mode)].append(np.nan if t is None else t)
                print(f"round {r}: {specs[i]['task']} batch {specs[i]['batch']} {mode}: "
                      f"{t:.0f} ms" if t is not None else "failed", flush=True)
    print(f"\nA: {' '.join(args.a) or '(as is)'}; B: {' '.join(args.b)}")
    print("\n| float32 | A, ms (min-max) | B, ms (min-max) | A / B per round (min-max) |")
    print("|---|---:|---:|---:|")
    for i, s in enumerate(specs):
        a, b = np.asarray(ms[(i, "A")]), np.asarray(ms[(i, "B")])
        q = a / b
        who = "Keras " if s["side"] == "keras" else ""
        print(f"| {who}{s['task']}, batch {s['batch']} | {np.nanmedian(a):.0f} ({np.nanmin(a):.0f}-"
              f"{np.nanmax(a):.0f}) | {np.nanmedian(b):.0f} ({np.nanmin(b):.0f}-{np.nanmax(b):.0f})"
              f" | {np.nanmedian(q):.2f} ({np.nanmin(q):.2f}-{np.nanmax(q):.2f}) |")


if __name__ == "__main__":
    main()
