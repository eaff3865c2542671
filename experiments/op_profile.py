"""Where a forward or train step of ours spends its time, per XLA:CPU operation kind.

    python experiments/op_profile.py --task forward --batch 8            # the full config
    python experiments/op_profile.py --task train --batch 8
    python experiments/op_profile.py --task cifar_train32 --config cifar

Builds the same compiled call as `bench/peer.py` (ours), runs it a few times, then records
`--calls` calls with `jax.profiler` and sums the time of each executed XLA operation,
grouped by kind (the operation's name without its number: `ynn_fusion` is a convolution or
matmul run by XNNPACK's successor YNNPACK with its fused elementwise epilogue,
`wrapped_reduce-window` a pooling, and so on). Times are per call; operations that run
concurrently on the two cores both count, so the sum can exceed the wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer import PRECISIONS, jax_call  # noqa: E402

# Host-side and runtime events of the trace, not XLA operations.
_NOT_OPS = ("ThunkExecutor", "$", "PjitFunction", "Transpose", "DevicePut", "Linearize",
            "Slinky", "Threadpool", "CommonPjRt", "end:", "Wait", "Handle", "Allocate",
            "Python", "ParseArg")


def record(call, calls: int) -> list[dict]:
    """The profiler's trace events of `calls` calls of `call`."""
    import jax
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(calls):
            call()
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]
        return json.load(gzip.open(path))["traceEvents"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="forward",
                   choices=["forward", "train", "cifar_train32", "cifar_train24"])
    p.add_argument("--config", default="full")
    p.add_argument("--precision", default="float32", choices=PRECISIONS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    import jax
    call, _ = jax_call(args.task, args.precision, args.batch, args.config)
    for _ in range(2):
        call()
    times = []
    for _ in range(args.calls):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    events = record(call, args.calls)
    ms: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or e["name"].startswith(_NOT_OPS):
            continue
        kind = re.sub(r"\.\d+$", "", e["name"])
        ms[kind] += e["dur"] / 1e3 / args.calls
        count[kind] += 1
    print(f"{args.task}, {args.config}, {args.precision}, batch {args.batch}, "
          f"JAX {jax.__version__}: {np.median(times) * 1e3:.0f} ms per call (median of "
          f"{args.calls}, unprofiled); operations {sum(ms.values()):.0f} ms per call")
    print("| operation kind | ms per call | share | executions per call |")
    print("|---|---:|---:|---:|")
    total = sum(ms.values())
    for kind, t in ms.most_common(args.top):
        print(f"| {kind} | {t:.1f} | {t / total:.1%} | {count[kind] // args.calls} |")


if __name__ == "__main__":
    main()
