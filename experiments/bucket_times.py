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

`--kernels auto,off` times the same programs lowered with each kernel library (the config's
`onednn` field: oneDNN's convolutions, or XLA's own) in the same rounds, and prints the
ratio per bucket: where each library is faster, one image at a time included.

    python experiments/bucket_times.py --min-bucket 1 --kernels auto,off --rounds 7
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnneb_jax import api  # noqa: E402
from cnneb_jax.model import build_model  # noqa: E402
from cnneb_jax.programs import branch, make_cascade, warm_up  # noqa: E402
from cnneb_jax.workdir import load_trained  # noqa: E402


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
    p.add_argument("--kernels", default="",
                   help="comma-separated values of the config's onednn field to compare "
                        "(e.g. auto,off); default: the workdir's own")
    args = p.parse_args()
    kernels = [k for k in args.kernels.split(",") if k] or [None]
    if kernels == [None]:
        cascades = {"": api.load(args.workdir, max_batch=args.max_batch)}
    else:
        model, variables = load_trained(args.workdir)
        cascades = {}
        for k in kernels:
            c = make_cascade(build_model(model.cfg.replace(onednn=k)), variables, args.max_batch)
            warm_up(c)
            cascades[k] = c
    c = next(iter(cascades.values()))
    m, size = c.model.num_exits, c.model.cfg.image_size
    x = np.random.default_rng(0).integers(0, 256, (c.max_batch, size, size, 3), np.uint8)
    sizes = [b for b in c.buckets if b >= args.min_bucket]
    # features at the branch point, kept on the device
    deep_in = {k: {b: branch(cc, 0, "seg", x)[:b] for b in sizes} for k, cc in cascades.items()}
    programs = ("first", "deep")

    def call(k: str, name: str, b: int) -> np.ndarray:
        """Runs program `name` of cascade `k` on a bucket of b and waits for its output."""
        cc = cascades[k]
        if name == "deep":
            return np.asarray(branch(cc, m - 1, "plain", deep_in[k][b]))
        return np.asarray(branch(cc, 0, args.variant, x[:b])[1])

    keys = [(k, n, b) for k in cascades for n in programs for b in sizes]
    for key in keys:   # warm
        call(*key)
    ms = {key: [] for key in keys}
    for _ in range(args.rounds):
        for key in keys:
            b = key[2]
            calls = max(1, args.images // b)
            t = time.perf_counter()
            for _ in range(calls):
                call(*key)
            ms[key].append(1e3 * (time.perf_counter() - t) / (calls * b))
    for k in cascades:
        for name in programs:
            top = np.array(ms[(k, name, sizes[-1])])
            print(f"\n{name} program{f' ({k})' if k else ''}, ms per image (median over "
                  f"{args.rounds} rounds) and ratio to bucket {sizes[-1]} (median of the "
                  f"per-round ratios, min-max)")
            print("| bucket | ms/image | ratio to the biggest |")
            print("|---:|---:|---:|")
            for b in sizes:
                r = np.array(ms[(k, name, b)]) / top
                print(f"| {b} | {np.median(ms[(k, name, b)]):.3f} | {np.median(r):.3f} "
                      f"({r.min():.3f}-{r.max():.3f}) |")
    if len(cascades) == 2:
        a, b_ = cascades
        print(f"\ntime with {b_} over time with {a}, per round (above 1: {a} faster), "
              "median (min-max)")
        print("| bucket | first program | deep program |")
        print("|---:|---:|---:|")
        for b in sizes:
            cells = []
            for name in programs:
                r = np.array(ms[(b_, name, b)]) / np.array(ms[(a, name, b)])
                cells.append(f"{np.median(r):.2f} ({r.min():.2f}-{r.max():.2f})")
            print(f"| {b} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
