"""Milliseconds per image of each branch program at each bucket size, in interleaved rounds.

    python experiments/bucket_times.py --workdir pretrained/cifar --rounds 7

The controller runs the first program (stem -> Mixed_5b, O1, the rule's expert) on each
chunk and the deep program (Mixed_5b -> end, O2) on the rows that go on. Routing overhead is
judged against the time of the two pure paths at the biggest bucket (issue 11, item 6), so
a deep program that runs faster or slower per image at a smaller bucket moves that figure
without any routing cost. This prints each program's time per image at every bucket size
of at least `--min-bucket`, relative to its time at the biggest, timed round by round
(one call of every size per round) on the compiled programs the controller uses. Needs the
machine to itself.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnneb_jax import api  # noqa: E402
from cnneb_jax.programs import branch  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="pretrained/cifar")
    p.add_argument("--variant", default="plain", help="the first program's variant (plain, "
                   "expert, aux5b: the rule's expert runs in it)")
    p.add_argument("--min-bucket", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--max-batch", type=int, default=256,
                   help="the biggest bucket compiled (api.load's max_batch)")
    p.add_argument("--images", type=int, default=1024,
                   help="images per timed call of each size (several calls of the bucket)")
    args = p.parse_args()
    c = api.load(args.workdir, max_batch=args.max_batch)
    m, size = c.model.num_exits, c.model.cfg.image_size
    x = np.random.default_rng(0).integers(0, 256, (c.max_batch, size, size, 3), np.uint8)
    feats = branch(c, 0, "seg", x)   # features at the branch point, kept on the device
    sizes = [b for b in c.buckets if b >= args.min_bucket]
    deep_in = {b: feats[:b] for b in sizes}
    programs = ("first", "deep")

    def call(name: str, b: int) -> np.ndarray:
        """Runs program `name` on a bucket of b and waits for its output."""
        if name == "deep":
            return np.asarray(branch(c, m - 1, "plain", deep_in[b]))
        return np.asarray(branch(c, 0, args.variant, x[:b])[1])

    for name in programs:   # warm
        for b in sizes:
            call(name, b)
    ms = {(n, b): [] for n in programs for b in sizes}
    for _ in range(args.rounds):
        for name in programs:
            for b in sizes:
                calls = max(1, args.images // b)
                t = time.perf_counter()
                for _ in range(calls):
                    call(name, b)
                ms[(name, b)].append(1e3 * (time.perf_counter() - t) / (calls * b))
    for name in programs:
        top = np.array(ms[(name, sizes[-1])])
        print(f"\n{name} program, ms per image (median over {args.rounds} rounds) and ratio to "
              f"bucket {sizes[-1]} (median of the per-round ratios, min-max)")
        print("| bucket | ms/image | ratio to the biggest |")
        print("|---:|---:|---:|")
        for b in sizes:
            r = np.array(ms[(name, b)]) / top
            print(f"| {b} | {np.median(ms[(name, b)]):.3f} | {np.median(r):.3f} "
                  f"({r.min():.3f}-{r.max():.3f}) |")


if __name__ == "__main__":
    main()
