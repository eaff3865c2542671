"""How fast is the `full` forward with segment 0 (stem -> Mixed_5b) in float32 and the rest
in bfloat16, against float32 and bfloat16 everywhere?

On the shipped `cifar` model that mix gives float32's labels on 99.85% (O1) / 99.84% (O2)
of the test images (experiments/precision_mix.py, experiments.md §22), within issue 31's
99.8%, where bfloat16 everywhere does not. What it costs on `full` was not measured. This
times the forward as bench/peer.py runs ours (its `jax_call`: the cascade's programs when
every image goes deep, random weights), each mix compiled once in this process, in interleaved rounds
(reversed every other round), and prints ms per batch, median over rounds with min-max,
and each mix's speed against float32 per round.

    python experiments/mixed_precision_speed.py --batches 1 8 32 --rounds 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from cnneb_jax.host_memory import keep_freed_memory  # noqa: E402

keep_freed_memory()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import benchlib  # noqa: E402
from peer import jax_call  # noqa: E402

# Each mix (segment 0's dtype, then the later segments' and heads') is a compute dtype of
# the library (configs.py); "fbb" is bfloat16_deep.
MIXES = {"fff": ("float32", "float32"), "bbb": ("bfloat16", "bfloat16"),
         "fbb": ("bfloat16_deep", "segment 0 float32, the rest bfloat16")}


def forward(mix: str, batch: int, config: str):
    """The forward of `mix` as bench/peer.py times ours, compiled and run twice."""
    call, _ = jax_call("forward", MIXES[mix][0], batch, config)
    call()
    call()
    return call


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="full")
    p.add_argument("--batches", type=int, nargs="+", default=[8])
    p.add_argument("--mixes", nargs="+", default=list(MIXES), choices=list(MIXES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per mix and round")
    args = p.parse_args(argv)
    print(f"{args.config}, {jax.devices()[0].platform}; {args.rounds} rounds of about "
          f"{args.seconds:.0f} s per mix; ms per batch, median over rounds (min-max)\n")
    print("| batch | " + " | ".join(MIXES[m][1] for m in args.mixes) + " | "
          + " | ".join(f"{m} speed vs fff" for m in args.mixes if m != "fff") + " |")
    print("|---:|" + "---:|" * (2 * len(args.mixes) - 1))
    for batch in args.batches:
        calls = {m: forward(m, batch, args.config) for m in args.mixes}
        ms = {m: [] for m in args.mixes}
        for r in range(args.rounds):
            for m in (args.mixes if r % 2 == 0 else args.mixes[::-1]):
                times, start = [], time.perf_counter()
                while len(times) < 3 or time.perf_counter() - start < args.seconds:
                    t = time.perf_counter()
                    calls[m]()
                    times.append((time.perf_counter() - t) * 1e3)
                ms[m].append(float(np.median(times)))
        cells = [benchlib.spread(ms[m], "{:,.0f}") for m in args.mixes]
        ratios = []
        for m in args.mixes:
            if m != "fff" and "fff" in ms:
                r = np.array(ms["fff"]) / np.array(ms[m])
                ratios.append(f"{np.median(r):.2f} ({r.min():.2f}-{r.max():.2f})")
        print(f"| {batch} | " + " | ".join(cells + ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
