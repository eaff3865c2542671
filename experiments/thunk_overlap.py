"""How much of a train step (or forward) of ours runs two XLA operations at once, and which.

    python experiments/thunk_overlap.py --task train --batch 8        # the full config

XLA:CPU's runtime runs independent operations (Inception's branches, a conv's data and
kernel gradients) on two threads at once. Each of oneDNN's calls already spreads over both
cores, so two at once share them. This records `--calls` calls with `jax.profiler` (as
experiments/op_profile.py does) and prints how long, per call, zero, one or two operations
were running, and for each operation kind its time and the part of it spent beside another
operation. Profiling slows the calls a little; the shares are what it is for.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from cnneb_jax.host_memory import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as our entry points and bench/peer.py's workers run

from op_profile import _NOT_OPS, record  # noqa: E402
from peer import PRECISIONS, jax_call  # noqa: E402


def overlaps(events: list[dict], calls: int) -> tuple[dict, dict]:
    """({k: ms per call with k operations running}, {kind: [ms, ms beside another, n]})."""
    ops = sorted((e for e in events if e.get("ph") == "X" and "dur" in e
                  and not e["name"].startswith(_NOT_OPS)), key=lambda e: e["ts"])
    edges = sorted([(e["ts"], 1) for e in ops] + [(e["ts"] + e["dur"], -1) for e in ops])
    running, last, at = 0, edges[0][0], collections.Counter()
    for t, d in edges:
        at[running] += t - last
        running, last = running + d, t
    starts = [e["ts"] for e in ops]
    longest = max(e["dur"] for e in ops)
    kinds: dict = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for e in ops:
        a, b = e["ts"], e["ts"] + e["dur"]
        spans = []
        for f in ops[bisect.bisect_left(starts, a - longest):]:
            if f["ts"] >= b:
                break
            lo, hi = max(a, f["ts"]), min(b, f["ts"] + f["dur"])
            if f is not e and hi > lo:
                spans.append((lo, hi))
        beside, start, end = 0.0, 0, None   # the union of the spans
        for lo, hi in sorted(spans):
            if end is None or lo > end:
                beside += 0 if end is None else end - start
                start, end = lo, hi
            else:
                end = max(end, hi)
        beside += 0 if end is None else end - start
        k = kinds[re.sub(r"\.\d+$", "", e["name"])]
        k[0] += e["dur"] / 1e3 / calls
        k[1] += beside / 1e3 / calls
        k[2] += 1
    return {n: t / 1e3 / calls for n, t in sorted(at.items())}, dict(kinds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="train", choices=["forward", "train", "cifar_train32",
                                                        "cifar_train24"])
    p.add_argument("--config", default="full")
    p.add_argument("--precision", default="float32", choices=PRECISIONS)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    import jax
    call, _ = jax_call(args.task, args.precision, args.batch, args.config)
    for _ in range(3):
        call()
    at, kinds = overlaps(record(call, args.calls), args.calls)
    print(f"{args.task}, {args.config}, {args.precision}, batch {args.batch}, JAX "
          f"{jax.__version__}, profiled, per call: "
          + ", ".join(f"{n} operations running {t:,.0f} ms" for n, t in at.items()))
    print("| operation kind | ms per call | of it beside another operation | executions |")
    print("|---|---:|---:|---:|")
    for kind, (ms, beside, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"| {kind} | {ms:,.0f} | {beside:,.0f} | {n // args.calls} |")


if __name__ == "__main__":
    main()
